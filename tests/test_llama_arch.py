"""model.arch="llama": the gated MLP (act(x @ w_gate) * (x @ w_in)) @ w_out, its param names,
projection to a dense llama model, training, and that "gpt" (the default) is unchanged."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import load_config, offset_params, random_batch
from pn_jax.config import ConfigError, validate
from pn_jax.model import build_model
from pn_jax.model.mlp import MLP, apply_mlp
from pn_jax.model.model_config import ModelConfig
from pn_jax.model.transformer import init_params
from pn_jax.specialize.project import project

TINY = dict(D=64, F=256, L=2, V=512)  # use_tiny's model (pn_jax/config.py)


def _llama(name: str):
  return load_config(name, "tiny,arch=llama")


def _shapes(tree) -> dict:
  return {jax.tree_util.keystr(path): tuple(leaf.shape)
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def _mlp_shapes(params, *prefix) -> dict:
  for key in prefix:
    params = params[key]
  return _shapes(params["blocks"]["mlp"])


def test_config_arg_selects_llama_with_silu_and_gpt_stays_the_default():
  for name in ("slm", "llm", "pn", "mix", "mix_shared"):
    llama, gpt = _llama(name).model, load_config(name).model
    assert (llama.arch, llama.activation) == ("llama", "silu")
    assert (gpt.arch, gpt.activation) == ("gpt", "gelu")
    assert {**llama.to_dict(), "arch": "gpt", "activation": "gelu"} == gpt.to_dict()
  assert load_config("quickstart", "arch=llama").model.arch == "llama"
  assert load_config("quickstart", "").model.arch == "gpt"
  with pytest.raises(ConfigError, match=r"argument 'arch=mistral': expected arch=gpt\|llama"):
    load_config("pn", "tiny,arch=mistral")


def test_unknown_arch_is_refused_naming_the_key():
  config = load_config("pn")
  config.model.arch = "mistral"
  with pytest.raises(ConfigError, match=r"^config\.model\.arch: unknown architecture 'mistral'; "
                     r"choose one of \('gpt', 'llama'\)"):
    validate(config)
  with pytest.raises(ConfigError, match=r"^config\.model\.arch: unknown architecture"):
    ModelConfig.from_config(config.model)


def test_old_saved_model_config_without_arch_is_gpt():
  old = load_config("pn").model.to_dict()
  del old["arch"]  # saved before the key existed
  assert ModelConfig.from_config(old).arch == "gpt"
  saved = load_config("pn")
  del saved.model["arch"]
  validate(saved)  # a saved run config without the key still validates


@pytest.mark.parametrize("shared", [True, False])
def test_gated_mlp_matches_the_formula(shared):
  """apply_mlp and the dense MLP module against (silu(x Wg) * (x Wi)) Wo in numpy, for weights
  shared by the batch ([1, ...]) and per sequence ([B, ...])."""
  B, T, D, F = 3, 5, 16, 32
  rng = np.random.default_rng(0)
  x = rng.normal(size=(B, T, D)).astype(np.float32)
  n = 1 if shared else B
  w_gate, w_in = (rng.normal(size=(n, D, F)).astype(np.float32) / 4 for _ in range(2))
  w_out = rng.normal(size=(n, F, D)).astype(np.float32) / 4
  gate = np.einsum("btd,bdf->btf", x, np.broadcast_to(w_gate, (B, D, F)))
  up = np.einsum("btd,bdf->btf", x, np.broadcast_to(w_in, (B, D, F)))
  silu = gate / (1 + np.exp(-gate))
  want = np.einsum("btf,bfd->btd", silu * up, np.broadcast_to(w_out, (B, F, D)))
  got = apply_mlp(jnp.asarray(x), w_in, w_out, "silu", w_gate=w_gate)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
  if shared:
    mlp = MLP(kind="dense", d_model=D, mlp_dim=F, activation="silu", gated=True,
              dtype=jnp.float32)
    params = {"params": {"w_gate": w_gate[0], "w_in": w_in[0], "w_out": w_out[0]}}
    np.testing.assert_allclose(mlp.apply(params, x, None), want, atol=1e-5, rtol=1e-5)
  # the gate matters: dropping it gives another function
  assert np.abs(np.asarray(apply_mlp(jnp.asarray(x), w_in, w_out, "silu")) - want).max() > 1e-2


def _abstract_params(model_cfg):
  """The params' shapes, without computing them (jax.eval_shape)."""
  return nn.unbox(jax.eval_shape(lambda r: init_params(build_model(model_cfg), r),
                                 jax.random.key(0)))


def test_llama_param_trees_have_the_contract_names_and_shapes():
  D, F, L = TINY["D"], TINY["F"], TINY["L"]
  dense = _abstract_params(_llama("slm").model)
  assert _mlp_shapes(dense) == {"['w_gate']": (L, D, F), "['w_in']": (L, D, F),
                                "['w_out']": (L, F, D)}
  mix_cfg = _llama("mix_shared").model
  k = mix_cfg.k
  assert _mlp_shapes(_abstract_params(mix_cfg)) == {
      "['T_gate']": (L, D, F, k), "['T_in']": (L, D, F, k), "['T_out']": (L, F, D, k)}
  pn_cfg = _llama("pn").model
  pn = _abstract_params(pn_cfg)
  m, h = pn_cfg.m, pn_cfg.h
  assert _mlp_shapes(pn) == {"['M']": (L, m, h), "['T_gate']": (L, D, F, h),
                             "['T_in']": (L, D, F, h), "['T_out']": (L, F, D, h)}
  assert pn["E"].shape == (pn_cfg.k, m)
  # the rest of the model is the gpt model's, name for name
  gpt_pn = _abstract_params(load_config("pn").model)
  assert {p: s for p, s in _shapes(pn).items() if "T_gate" not in p} == _shapes(gpt_pn)
  small = []

  def project_0(p):
    dense_params, small_cfg = project(p, pn_cfg, 0)
    small.append(small_cfg)
    return dense_params

  projected = jax.eval_shape(project_0, pn)
  assert small[0].arch == "llama" and small[0].mlp_kind == "dense"
  assert _shapes(projected) == _shapes(dense)
  mix = _llama("mix").model
  assert _mlp_shapes(_abstract_params(mix), "experts") == {
      p: (mix.k,) + s for p, s in _mlp_shapes(dense).items()}


@pytest.mark.parametrize("kind", ["pn", "mix_shared"])
def test_projected_llama_expert_equals_the_cluster_path(kind):
  """project() of a llama PN / mixture, run as a dense llama LM, gives the routed model's logits
  on that cluster; and the experts differ (so the check can fail)."""
  cfg = _llama(kind).model
  model = build_model(cfg)
  params = offset_params(model)
  tokens = jax.random.randint(jax.random.key(2), (3, 32), 0, cfg.vocab_size)
  routed_apply = jax.jit(model.apply)
  small_apply, outputs = None, []
  for cluster in range(cfg.k):
    dense_params, small_cfg = project(params, cfg, cluster)
    assert set(dense_params["blocks"]["mlp"]) == {"w_gate", "w_in", "w_out"}
    small_apply = small_apply or jax.jit(build_model(small_cfg).apply)
    got = small_apply({"params": dense_params}, tokens)
    want = routed_apply({"params": params}, tokens, jnp.full((3,), cluster, jnp.int32))
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5)
    outputs.append(want)
  assert float(jnp.max(jnp.abs(outputs[0] - outputs[1]))) > 1e-3


def test_independent_llama_expert_equals_its_slice():
  cfg = _llama("mix").model
  model = build_model(cfg)
  params = offset_params(model)
  tokens = jax.random.randint(jax.random.key(2), (cfg.k, 16), 0, cfg.vocab_size)
  logits = jax.jit(model.apply)({"params": params}, tokens)
  dense_params, small_cfg = project(params, cfg, 1)
  got = build_model(small_cfg).apply({"params": dense_params}, tokens[1:2])
  np.testing.assert_allclose(got, logits[1:2], atol=2e-5, rtol=2e-5)


def test_tiny_llama_pn_trains():
  """A few steps on one fixed batch: the loss falls (the gate and its T_gate get gradients)."""
  from pn_jax.parallel import mesh as mesh_lib
  from pn_jax.train.compile import step_options
  from pn_jax.train.optimizer import make_optimizer
  from pn_jax.train.state import create_state
  from pn_jax.train.step import make_train_step
  config = _llama("pn")
  config.data.seq_len = 32
  config.mesh.update(data=1, fsdp=1, tensor=1)
  config.optim.warmup_steps = 0
  mesh, rules = mesh_lib.make_mesh(config, jax.devices()[:1]), mesh_lib.logical_rules(config)
  model = build_model(config.model)
  tx, schedule = make_optimizer(config)
  step = jax.jit(make_train_step(model, tx, schedule, **step_options(config)))
  with mesh_lib.activate(mesh, rules):
    state, _ = create_state(model, tx, mesh, rules, jax.random.key(0))
    start = jax.device_get(state.params)
    batch = mesh_lib.global_batch(random_batch(config), mesh)
    losses = []
    for _ in range(8):
      state, metrics = step(state, batch)
      losses.append(float(metrics["loss"]))
  assert losses[-1] < losses[0] - 0.5, losses
  moved = jax.device_get(state.params)["blocks"]["mlp"]["T_gate"] - start["blocks"]["mlp"]["T_gate"]
  assert np.abs(moved).max() > 0


def test_gpt_models_have_no_gate():
  """The default arch builds the same trees as before the option existed: no w_gate / T_gate."""
  for name in ("slm", "pn", "mix_shared", "mix"):
    names = set(_shapes(_abstract_params(load_config(name).model)))
    assert not any("gate" in p for p in names), name
    assert any("w_in" in p or "T_in" in p for p in names)


@pytest.mark.parametrize("kind,h", [("dense", 1), ("projected", 8)])
def test_the_gate_is_drawn_after_the_gpt_params(kind, h):
  """Same seed: a gated MLP's w_in/w_out (T_in/T_out) are exactly the gpt MLP's, because the
  gate is created last and only when gated, so a gpt init draws what it drew before."""
  x, code = jnp.ones((1, 2, 16)), jnp.ones((1, 4)) / 2
  def init(gated):
    mlp = MLP(kind=kind, d_model=16, mlp_dim=32, h=h, m=4, gated=gated, dtype=jnp.float32)
    return nn.unbox(mlp.init(jax.random.key(0), x, code))["params"]
  gpt, llama = init(False), init(True)
  assert set(llama) - set(gpt) == {"w_gate" if kind == "dense" else "T_gate"}
  for name in gpt:
    if name != "M":  # M comes after T_gate in a gated projected MLP
      np.testing.assert_array_equal(gpt[name], llama[name])


def test_flops_count_the_gate_matrix():
  """llama: one more [D, F] matrix per layer, counted as active params and in forming W; an
  old saved config without model.arch counts as gpt."""
  from pn_jax.config import small_model_config
  from pn_jax.train import flops
  gpt, llama = load_config("pn").model, _llama("pn").model
  L, D, F = gpt.n_layers, gpt.d_model, gpt.mlp_dim
  assert flops.active_matmul_params(llama) - flops.active_matmul_params(gpt) == L * D * F

  def total(m):
    return sum(int(np.prod(s)) for s in _shapes(_abstract_params(m)).values())

  def forming(m):  # the FLOPs of forming the experts' weights
    return (flops.train_flops_per_step(m, 8, 32, experts_per_step=2)
            - flops.train_flops_per_step(small_model_config(m), 8, 32))

  assert total(small_model_config(llama)) - total(small_model_config(gpt)) == L * D * F
  assert forming(llama) * 2 == forming(gpt) * 3
  old = load_config("pn").model
  del old["arch"]
  assert flops.train_flops_per_step(old, 8, 32) == flops.train_flops_per_step(gpt, 8, 32)
