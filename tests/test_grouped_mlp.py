"""model.mixed_mlp="grouped": a mixed-cluster batch sorted by cluster, one MLP weight per distinct
cluster applied with jax.lax.ragged_dot, outputs back in the caller's order. Same params, same
logits and gradients as the default per-sequence path (float32 tiny models on CPU)."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import load_config, offset_params
from pn_jax.config import ConfigError, validate
from pn_jax.model import build_model
from pn_jax.model.model_config import ModelConfig
from pn_jax.model.transformer import cluster_groups, init_params

T = 8  # sequence length of the test batches (the model's max_len is larger)

# (k, clusters [B]): unsorted, with clusters absent from the batch; B > k (clusters shared by
# several sequences) and B < k (padding slots).
CASES = {
    "B>k": (4, [3, 1, 3, 0, 1, 3, 0]),  # cluster 2 absent; G = 4 slots, one padding
    "B<k": (6, [5, 1, 4]),  # clusters 0, 2, 3 absent; G = 3 slots, none padding
    "one_expert_used": (3, [2, 2, 2, 2]),  # G = 3 slots, two padding
}


def _models(name: str, arch: str, k: int, **change):
  """(per_sequence LM, grouped LM) of configs/<name>.py:tiny with k experts."""
  config = load_config(name, f"tiny,arch={arch}")
  config.model.update(k=k, **change)
  validate(config)
  per_seq = ModelConfig.from_config(config.model)
  assert per_seq.mixed_mlp == "per_sequence"  # the default
  return build_model(per_seq), build_model(dataclasses.replace(per_seq, mixed_mlp="grouped"))


def _batch(clusters, vocab_size: int, seed: int = 0):
  rng = np.random.default_rng(seed)
  tokens = jnp.asarray(rng.integers(0, vocab_size, (len(clusters), T)), jnp.int32)
  return tokens, jnp.asarray(clusters, jnp.int32)


def _logits(model, params, tokens, cluster, **kw):
  return jax.jit(lambda p: model.apply({"params": p}, tokens, cluster, **kw))(params)


def _grads(model, params, tokens, cluster, weights):
  loss = lambda p: jnp.sum(model.apply({"params": p}, tokens, cluster) * weights)
  return jax.jit(jax.grad(loss))(params)


def test_cluster_groups_sorts_and_counts_tokens_per_distinct_cluster():
  order, slot, sizes = cluster_groups(jnp.array([3, 1, 3, 0, 1, 3]), 5, seq_len=T)
  assert order.tolist() == [3, 1, 4, 0, 2, 5]  # stable: ties keep the caller's order
  assert slot.tolist() == [0, 1, 3, 4, 4]  # G = min(5, 6); padding (k) clipped to k - 1
  assert sizes.tolist() == [T, 2 * T, 3 * T, 0, 0] and sizes.dtype == jnp.int32
  order, slot, sizes = cluster_groups(jnp.array([2, 0]), 8, seq_len=T)
  assert (order.tolist(), slot.tolist(), sizes.tolist()) == ([1, 0], [0, 2], [T, T])


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("arch", ["gpt", "llama"])
@pytest.mark.parametrize("name", ["pn", "mix_shared"])  # projected, mixture
def test_grouped_equals_per_sequence_logits_and_gradients(name, arch, case):
  k, clusters = CASES[case]
  per_seq, grouped = _models(name, arch, k)
  params = offset_params(per_seq)
  tokens, cluster = _batch(clusters, per_seq.cfg.vocab_size)
  # Same param tree (names, shapes) either way.
  shapes = lambda m: jax.tree.map(lambda x: x.shape, jax.eval_shape(
      functools.partial(init_params, m), jax.random.key(0)))
  assert shapes(per_seq) == shapes(grouped)
  # The grouped path is the one taken: ragged_dot in the program, none in the default one.
  jaxpr = lambda m: str(jax.make_jaxpr(lambda p: m.apply({"params": p}, tokens, cluster))(params))
  assert "ragged_dot" in jaxpr(grouped) and "ragged_dot" not in jaxpr(per_seq)

  want = _logits(per_seq, params, tokens, cluster)
  got = _logits(grouped, params, tokens, cluster)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
  # The comparison can fail: the caller's order matters (were the outputs left sorted, or
  # a sequence given another cluster's expert, the logits would differ).
  order = np.argsort(clusters, kind="stable")
  if case != "one_expert_used":  # (not an involution: un-permuting by `order` itself would fail)
    assert (order[order] != np.arange(len(order))).any()
    assert not np.allclose(want[order], want, atol=1e-3)
  other = _logits(per_seq, params, tokens, (cluster + 1) % k)
  assert not np.allclose(other, want, atol=1e-3)

  weights = jax.random.normal(jax.random.key(7), want.shape)
  g_want = _grads(per_seq, params, tokens, cluster, weights)
  g_got = _grads(grouped, params, tokens, cluster, weights)
  # The gradients are O(10-500) (a sum over B*T*V logits): atol 1e-5 of each tensor's scale
  # (measured float32 differences: <= 1.3e-6 of it).
  jax.tree.map(lambda a, b: np.testing.assert_allclose(
      a, b, rtol=1e-5, atol=1e-5 * np.abs(b).max()), g_got, g_want)
  if name == "pn":  # absent clusters' codes get no gradient; present ones do
    present = np.isin(np.arange(k), clusters)
    assert np.all(np.abs(np.asarray(g_got["E"]))[~present] == 0)
    assert np.all(np.abs(np.asarray(g_got["E"])).sum(-1)[present] > 0)


def test_grouped_through_scanned_rematerialised_layers():
  per_seq, grouped = _models("pn", "llama", 4, scan_layers=True, remat="full")
  params = offset_params(per_seq)
  tokens, cluster = _batch(CASES["B>k"][1], per_seq.cfg.vocab_size)
  want = _logits(per_seq, params, tokens, cluster)
  np.testing.assert_allclose(_logits(grouped, params, tokens, cluster), want, atol=1e-5,
                             rtol=1e-5)
  hidden, _ = _logits(grouped, params, tokens, cluster, return_hidden=True)
  hidden_want, _ = _logits(per_seq, params, tokens, cluster, return_hidden=True)
  np.testing.assert_allclose(hidden, hidden_want, atol=1e-5, rtol=1e-5)  # caller's order


@pytest.mark.parametrize("name", ["pn", "mix_shared", "slm"])
def test_one_cluster_batches_and_dense_models_ignore_mixed_mlp(name):
  per_seq, grouped = _models(name, "gpt", 4)
  params = offset_params(per_seq)
  tokens, cluster = _batch([2, 2, 2], per_seq.cfg.vocab_size)
  one = dict(one_cluster=name != "slm")
  program = lambda m: str(jax.make_jaxpr(
      lambda p: m.apply({"params": p}, tokens, cluster, **one))(params))
  assert program(grouped) == program(per_seq) and "ragged_dot" not in program(grouped)
  assert (_logits(grouped, params, tokens, cluster, **one)
          == _logits(per_seq, params, tokens, cluster, **one)).all()


def test_unknown_mixed_mlp_is_refused_naming_the_key_and_old_configs_are_per_sequence():
  config = load_config("pn")
  config.model.mixed_mlp = "sorted"
  with pytest.raises(ConfigError, match=r"^config\.model\.mixed_mlp: unknown mixed-batch MLP "
                     r"'sorted'; choose one of \('per_sequence', 'grouped'\)"):
    validate(config)
  old = load_config("pn").model.to_dict()
  del old["mixed_mlp"]  # saved before the key existed
  assert ModelConfig.from_config(old).mixed_mlp == "per_sequence"


@pytest.mark.parametrize("backend,kind,warned", [
    ("gpu", "projected", True), ("gpu", "mixture", True), ("cpu", "projected", False)])
def test_grouped_on_gpu_is_warned_before_compiling(monkeypatch, caplog, backend, kind, warned):
  """ragged_dot is a dense masked product on GPU (measured ~23x slower, OOM at the bench shape):
  compile_steps says so when a grouped mixture/PN will run there (its eval step always runs
  mixed batches); a grouped setting on a dense model changes nothing and is not warned about."""
  from pn_jax.train import compile as compile_lib
  _, grouped = _models("pn" if kind == "projected" else "mix_shared", "gpt", 4)
  assert grouped.cfg.mlp_kind == kind
  dense_cfg = dataclasses.replace(grouped.cfg, mlp_kind="dense")
  monkeypatch.setattr(compile_lib.jax, "default_backend", lambda: backend)
  with caplog.at_level("WARNING"):
    compile_lib.warn_grouped_on_gpu(dense_cfg)
    assert "mixed_mlp=grouped" not in caplog.text
    compile_lib.warn_grouped_on_gpu(grouped.cfg)
  assert ("mixed_mlp=grouped on GPU" in caplog.text) == warned
