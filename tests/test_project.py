"""project(): the dense small model equals the PN (or shared mixture) on its cluster's path."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import load_config, offset_params
from pn_jax.model import build_model
from pn_jax.model.transformer import init_params
from pn_jax.specialize.project import project


def _model_and_params(kind):
  cfg = load_config(kind).model
  model = build_model(cfg)
  return cfg, model, offset_params(model)


def _apply(model):
  """jit: un-jitted apply dispatches every op of the scanned model one by one (slow)."""
  return jax.jit(model.apply, static_argnames=("one_cluster",))


@pytest.mark.parametrize("kind", ["pn", "mix_shared"])  # independent experts: test_experts.py
def test_projected_small_model_equals_cluster_path(kind):
  cfg, model, params = _model_and_params(kind)
  tokens = jax.random.randint(jax.random.key(2), (3, 32), 0, cfg.vocab_size)
  pn_apply = _apply(model)
  small_apply = None
  for cluster in range(cfg.k):
    dense_params, small_cfg = project(params, cfg, cluster)
    assert small_cfg.mlp_kind == "dense"
    small = build_model(small_cfg)
    small_apply = small_apply or _apply(small)
    got = small_apply({"params": dense_params}, tokens)
    want = pn_apply({"params": params}, tokens, jnp.full((3,), cluster, jnp.int32))
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5)
    # the shape of the result really is the small model's
    small_shapes = jax.tree.map(jnp.shape, nn.unbox(
        jax.eval_shape(lambda r: init_params(small, r), jax.random.key(0))))
    assert jax.tree.map(jnp.shape, dense_params) == small_shapes


def test_experts_differ_so_equivalence_is_not_trivial():
  cfg, model, params = _model_and_params("pn")
  tokens = jax.random.randint(jax.random.key(2), (1, 16), 0, cfg.vocab_size)
  apply = _apply(model)
  a = apply({"params": params}, tokens, jnp.array([0]))
  b = apply({"params": params}, tokens, jnp.array([1]))
  assert float(jnp.max(jnp.abs(a - b))) > 1e-3


def test_mixed_batch_routes_each_sequence_to_its_own_expert():
  cfg, model, params = _model_and_params("pn")
  tokens = jax.random.randint(jax.random.key(2), (cfg.k, 16), 0, cfg.vocab_size)
  cluster = jnp.arange(cfg.k, dtype=jnp.int32)
  apply = _apply(model)
  mixed = apply({"params": params}, tokens, cluster)
  for c in range(cfg.k):
    alone = apply({"params": params}, tokens[c:c + 1], cluster[c:c + 1], one_cluster=True)
    np.testing.assert_allclose(mixed[c:c + 1], alone, atol=2e-5, rtol=2e-5)


def test_project_rejects_bad_input():
  cfg, _, params = _model_and_params("pn")
  with pytest.raises(ValueError, match="out of range"):
    project(params, cfg, cfg.k)
  dense_cfg = load_config("slm").model
  with pytest.raises(ValueError, match="already dense"):
    project(params, dense_cfg, 0)


@pytest.mark.parametrize("kind", ["pn", "mix_shared"])
def test_projection_by_cluster_shares_averages_the_experts_weights(kind):
  """select='shares': one-hot shares give that cluster's expert exactly; other shares give
  every MLP weight as the share-weighted mean of the experts' (W is linear in the code), and
  attention, embeddings and norms unchanged."""
  cfg, _, params = _model_and_params(kind)
  one_hot = np.eye(cfg.k)[1]
  jax.tree.map(np.testing.assert_array_equal, project(params, cfg, 0, shares=one_hot)[0],
               project(params, cfg, 1)[0])
  shares = np.arange(1, cfg.k + 1, dtype=np.float64)  # unnormalized: normalized inside
  mixed, small_cfg = project(params, cfg, 0, shares=shares)
  experts = [project(params, cfg, c)[0] for c in range(cfg.k)]
  want = jax.tree.map(lambda *w: sum(s * x for s, x in zip(shares / shares.sum(), w)), *experts)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), mixed, want)
  assert small_cfg.mlp_kind == "dense"
  with pytest.raises(ValueError, match="cluster shares must be k="):
    project(params, cfg, 0, shares=np.zeros(cfg.k))
  with pytest.raises(ValueError, match="cluster shares must be k="):
    project(params, cfg, 0, shares=np.ones(cfg.k + 1))
