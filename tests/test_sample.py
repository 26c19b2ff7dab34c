"""Sampling: the KV-cache path equals the full forward, and draws are deterministic per seed."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import load_config
from pn_jax import generate
from pn_jax.model import build_model
from pn_jax.model.transformer import init_params


def _model_and_params(kind):
  model = build_model(load_config(kind).model)
  params = nn.unbox(init_params(model, jax.random.key(0)))
  # Off the init so the logits are far from uniform and draws depend on them.
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  params = treedef.unflatten([p + 0.1 * jax.random.normal(k, p.shape) for p, k in
                              zip(leaves, keys)])
  return model, params


@pytest.fixture(scope="module")
def model_and_params():
  """A PN: its expert routing (cluster) goes through the sampler too."""
  return _model_and_params("pn")


def test_kv_cache_logits_equal_full_forward(model_and_params):
  """(The dense path shares this Attention code; only the MLP differs, and it is not cached.)"""
  model, params = model_and_params
  tokens = jax.random.randint(jax.random.key(2), (2, 12), 0, model.cfg.vocab_size)
  cluster = jnp.array([1, 1], jnp.int32)
  full = jax.jit(model.apply, static_argnames="one_cluster")(
      {"params": params}, tokens, cluster, one_cluster=True)
  cached = generate.cached_logits(model, params, tokens, prefix=5, cluster_B=cluster)
  assert cached.shape == full.shape
  np.testing.assert_allclose(cached, full, atol=1e-4, rtol=1e-4)


def test_sampling_is_deterministic_and_cache_matches_no_cache(model_and_params):
  model, params = model_and_params
  kw = dict(new_tokens=12, temperature=1.0, top_k=50, top_p=0.95, num_samples=3, cluster=1)
  a = generate.generate(model, params, [2, 7, 9], seed=3, **kw)
  b = generate.generate(model, params, [2, 7, 9], seed=3, **kw)
  c = generate.generate(model, params, [2, 7, 9], seed=4, **kw)
  ref = generate.generate(model, params, [2, 7, 9], seed=3, use_cache=False, **kw)
  assert a.shape == (3, 15) and (np.asarray(a[:, :3]) == [2, 7, 9]).all()
  np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(a, ref)
  assert not np.array_equal(a, c)
  assert len({tuple(r) for r in np.asarray(a).tolist()}) > 1  # samples in a batch differ


def test_top_k_one_is_greedy(model_and_params):
  model, params = model_and_params
  greedy = generate.generate(model, params, [2, 5], new_tokens=6, temperature=0.0, seed=0,
                           cluster=2)
  top1 = generate.generate(model, params, [2, 5], new_tokens=6, top_k=1, seed=11, cluster=2)
  np.testing.assert_array_equal(greedy, top1)


def test_filter_logits_keeps_the_nucleus():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
  kept = lambda **kw: np.isfinite(np.asarray(generate.filter_logits(logits, **kw))) & (
      np.asarray(generate.filter_logits(logits, **kw)) > -1e30)
  np.testing.assert_array_equal(kept(top_p=0.7), [[True, True, False, False]])
  np.testing.assert_array_equal(kept(top_p=0.5), [[True, False, False, False]])
  np.testing.assert_array_equal(kept(top_k=3), [[True, True, True, False]])
  np.testing.assert_array_equal(kept(top_p=1.0), [[True] * 4])


def test_prompt_too_long_is_refused(model_and_params):
  model, params = model_and_params
  with pytest.raises(ValueError, match="max_len"):
    generate.generate(model, params, [2] * 100, new_tokens=100)
