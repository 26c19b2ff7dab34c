"""The PN basis T stored in bfloat16 (model.basis_dtype): the same model to bfloat16 rounding,
updates that survive rounding in expectation, a projection in float32, clear refusals."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import load_config
from pn_jax.config import ConfigError, small_model_config, validate
from pn_jax.model import build_model
from pn_jax.model.transformer import init_params
from pn_jax.specialize.project import project
from pn_jax.train.basis_moments import apply_updates
from pn_jax.train.optimizer import clip_by_global_norm, global_norm


def _pn(basis_dtype="bfloat16", kind="pn"):
  config = load_config(kind)
  config.model.basis_dtype = basis_dtype
  validate(config)
  return config


def test_only_the_basis_is_bfloat16_and_the_model_is_the_same_to_rounding():
  cfg16, cfg32 = _pn().model, _pn("float32").model
  m16, m32 = build_model(cfg16), build_model(cfg32)
  p16 = nn.unbox(init_params(m16, jax.random.key(0)))
  mlp = p16["blocks"]["mlp"]
  assert mlp["T_in"].dtype == mlp["T_out"].dtype == jnp.bfloat16
  assert mlp["M"].dtype == p16["E"].dtype == p16["embed"].dtype == jnp.float32
  p32 = jax.tree.map(lambda x: x.astype(jnp.float32), p16)  # the same weights in float32
  tokens = jax.random.randint(jax.random.key(1), (4, 32), 0, cfg16.vocab_size)
  cluster = jnp.arange(4, dtype=jnp.int32)
  got = jax.jit(m16.apply)({"params": p16}, tokens, cluster)
  want = jax.jit(m32.apply)({"params": p32}, tokens, cluster)
  # W is formed in bfloat16 from a bfloat16-rounded code: logits agree to that rounding
  assert float(jnp.max(jnp.abs(got - want))) < 0.1 * float(jnp.std(want))
  assert float(jnp.max(jnp.abs(got - want))) > 0  # and it really ran in bfloat16


def test_stochastic_updates_move_a_bfloat16_basis_in_expectation():
  """An update of 1/40 of a bfloat16 step, 200 times: round-to-nearest never moves the weight,
  stochastic rounding moves it by the sum of the updates (mean over 4096 elements)."""
  params = {"blocks": {"mlp": {"T_in": jnp.ones((4096,), jnp.bfloat16)}},
            "embed": jnp.ones((4096,), jnp.float32)}
  u = 2.0 ** -7 / 40  # bfloat16's step at 1.0 is 2^-7
  updates = jax.tree.map(lambda p: jnp.full(p.shape, u, p.dtype), params)
  step = jax.jit(apply_updates)
  p = params
  for i in range(200):
    p = step(p, updates, jnp.int32(i))
  moved = float(jnp.mean(p["blocks"]["mlp"]["T_in"].astype(jnp.float32))) - 1.0
  np.testing.assert_allclose(moved, 200 * u, rtol=0.05)
  nearest = optax.apply_updates(params, updates)["blocks"]["mlp"]["T_in"]
  assert float(jnp.max(jnp.abs(nearest.astype(jnp.float32) - 1.0))) == 0.0
  one = step(params, updates, jnp.int32(0))  # every other leaf: optax.apply_updates exactly
  np.testing.assert_array_equal(one["embed"], optax.apply_updates(params, updates)["embed"])
  assert one["blocks"]["mlp"]["T_in"].dtype == jnp.bfloat16
  again = step(params, updates, jnp.int32(0))  # the same step rounds the same way
  np.testing.assert_array_equal(again["blocks"]["mlp"]["T_in"], one["blocks"]["mlp"]["T_in"])


def test_the_clip_sums_bfloat16_squares_in_float32():
  """2^20 entries of 1/16 in bfloat16: summing their squares in bfloat16 stalls far below the
  true 2^12; global_norm gives sqrt(2^12) = 64 and clips by it."""
  g = {"T_in": jnp.full((1 << 20,), 1 / 16, jnp.bfloat16), "w": jnp.zeros((3,), jnp.float32)}
  np.testing.assert_allclose(float(global_norm(g)), 64.0, rtol=1e-6)
  clipped, _ = clip_by_global_norm(8.0).update(g, optax.EmptyState())
  np.testing.assert_allclose(float(global_norm(clipped)), 8.0, rtol=1e-2)
  assert clipped["T_in"].dtype == jnp.bfloat16
  f32 = {"a": jnp.arange(5.0), "b": jnp.ones((2, 3))}  # float32: optax's value exactly
  assert float(global_norm(f32)) == float(optax.tree.norm(f32))


@pytest.mark.parametrize("kind", ["pn", "mix_shared"])
def test_a_bfloat16_basis_projects_to_a_float32_small_model(kind):
  cfg = _pn(kind=kind).model
  model = build_model(cfg)
  params = nn.unbox(init_params(model, jax.random.key(3)))
  dense, small_cfg = project(params, cfg, 1)
  assert small_cfg.basis_dtype == "float32" and small_cfg.mlp_kind == "dense"
  assert {x.dtype for x in jax.tree.leaves(dense)} == {jnp.dtype(jnp.float32)}
  tokens = jax.random.randint(jax.random.key(2), (3, 32), 0, cfg.vocab_size)
  got = jax.jit(build_model(small_cfg).apply)({"params": dense}, tokens)
  want = jax.jit(model.apply)({"params": params}, tokens, jnp.ones((3,), jnp.int32))
  # the small model forms W from T exactly (float32); the PN's path rounds W to bfloat16
  assert float(jnp.max(jnp.abs(got - want))) < 0.1 * float(jnp.std(want))


def test_basis_dtype_config_is_checked():
  config = load_config("pn")
  config.model.basis_dtype = "float16"
  with pytest.raises(ConfigError, match="model.basis_dtype: unknown 'float16'"):
    validate(config)
  slm = load_config("slm")
  slm.model.basis_dtype = "bfloat16"
  with pytest.raises(ConfigError, match="model.basis_dtype: .*mlp_kind='dense' and has none"):
    validate(slm)
  assert small_model_config(_pn().model).basis_dtype == "float32"


def test_a_resume_that_changes_the_basis_dtype_is_refused_by_name():
  from pn_jax.train import resume_check
  saved = resume_check.as_json(_pn("float32"))
  now = resume_check.as_json(_pn("bfloat16"))
  culprits, leaves = resume_check.shape_changing(saved, now, ["model.basis_dtype"])
  assert culprits == ["model.basis_dtype"]
  assert any("['T_in']: checkpoint (2, 64, 256, 8), this config bfloat16 (2, 64, 256, 8)" in leaf
             for leaf in leaves), leaves
