"""The PN equation, its initialisation, and the mixture-as-PN special case."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pn_jax.model.mlp import MLP, dense_init, pn_weight


def test_pn_weight_matches_the_papers_sum():
  k, m, h, a, b = 3, 2, 4, 5, 6
  rng = np.random.default_rng(0)
  E, M, T = rng.normal(size=(k, m)), rng.normal(size=(m, h)), rng.normal(size=(a, b, h))
  for i in range(k):
    expected = np.zeros((a, b))
    for q in range(m):
      for r in range(h):
        expected += E[i, q] * M[q, r] * T[:, :, r]
    np.testing.assert_allclose(pn_weight(jnp.asarray(E[i]), M, T), expected, rtol=1e-5,
                               atol=1e-5)
  np.testing.assert_allclose(pn_weight(jnp.asarray(E), M, T)[1], pn_weight(E[1], M, T),
                             rtol=1e-6)


def _mlp(kind, h=1, m=1):
  return MLP(kind=kind, d_model=16, mlp_dim=32, h=h, m=m, dtype=jnp.float32)


def test_hard_mixture_is_pn_with_identity_code_and_projection():
  k = 3
  x = jax.random.normal(jax.random.key(0), (k, 5, 16))
  cluster = jnp.arange(k)
  mix = _mlp("mixture", h=k)
  mix_params = nn.unbox(mix.init(jax.random.key(1), x, jax.nn.one_hot(cluster, k)))
  pn = _mlp("projected", h=k, m=k)
  pn_params = {"params": {**mix_params["params"], "M": jnp.eye(k)}}
  E = jnp.eye(k)  # one-hot rows
  np.testing.assert_allclose(pn.apply(pn_params, x, E[cluster]),
                             mix.apply(mix_params, x, jax.nn.one_hot(cluster, k)), atol=1e-6)
  # and each mixture expert is exactly its dense slice
  dense = _mlp("dense")
  for i in range(k):
    p = {"params": {"w_in": mix_params["params"]["T_in"][..., i],
                    "w_out": mix_params["params"]["T_out"][..., i]}}
    np.testing.assert_allclose(dense.apply(p, x[i:i + 1], None),
                               mix.apply(mix_params, x[i:i + 1], jax.nn.one_hot(cluster[i:i + 1], k)),
                               atol=1e-6)


@pytest.mark.parametrize("h,m", [(8, 4), (4, 1), (16, 16)])
def test_projected_weights_have_dense_init_variance(h, m):
  """E rows unit norm, M orthonormal rows: Var(W) must equal the dense init's 1/fan_in."""
  from pn_jax.model.transformer import unit_rows_init
  D, F = 128, 256
  mlp = MLP(kind="projected", d_model=D, mlp_dim=F, h=h, m=m, dtype=jnp.float32)
  E = unit_rows_init(jax.random.key(2), (5, m))
  x = jnp.zeros((1, 1, D))
  params = nn.unbox(mlp.init(jax.random.key(3), x, E[:1]))["params"]
  w_in = pn_weight(E, params["M"], params["T_in"])  # [5, D, F]
  dense_w = dense_init(D)(jax.random.key(4), (D, F))
  np.testing.assert_allclose(jnp.var(w_in, axis=(1, 2)), jnp.var(dense_w), rtol=0.05)
  np.testing.assert_allclose(jnp.var(dense_w), 1.0 / D, rtol=0.05)


def test_shared_weight_path_equals_per_sequence_path():
  """A one-cluster batch may form the weights once ([1, m] code): same outputs."""
  mlp = _mlp("projected", h=6, m=3)
  x = jax.random.normal(jax.random.key(0), (4, 5, 16))
  code = jax.random.normal(jax.random.key(1), (1, 3))
  params = nn.unbox(mlp.init(jax.random.key(2), x, code))
  shared = mlp.apply(params, x, code)
  per_seq = mlp.apply(params, x, jnp.repeat(code, 4, axis=0))
  np.testing.assert_allclose(shared, per_seq, atol=1e-5)


def test_auto_attention_uses_cudnn_only_where_it_runs(monkeypatch):
  """cuDNN flash attention takes 16-bit inputs only: a float32 model (the tiny configs) on a GPU
  must get the XLA kernel, not a NotImplementedError at its first step."""
  import jax.numpy as jnp
  from pn_jax.model import transformer
  monkeypatch.setattr(transformer.jax, "default_backend", lambda: "gpu")
  assert transformer.attention_impl("auto", jnp.bfloat16) == "cudnn"
  assert transformer.attention_impl("auto", jnp.float16) == "cudnn"
  assert transformer.attention_impl("auto", jnp.float32) == "xla"
  monkeypatch.setattr(transformer.jax, "default_backend", lambda: "cpu")
  assert transformer.attention_impl("auto", jnp.bfloat16) == "xla"
  assert transformer.attention_impl("cudnn", jnp.float32) == "cudnn"  # explicit choice kept


def test_shared_code_init_gives_unit_codes_near_one_direction():
  """code_init=shared: unit rows (so Var(W) stays the dense init's) that start alike (cosine
  ~0.94), where random rows are nearly unrelated; the model builds E with the chosen init."""
  from conftest import load_config
  from pn_jax.model import build_model
  from pn_jax.model.transformer import init_params, shared_rows_init, unit_rows_init
  k, m = 32, 16
  off_diagonal = ~np.eye(k, dtype=bool)
  shared = shared_rows_init(jax.random.key(0), (k, m))
  np.testing.assert_allclose(jnp.linalg.norm(shared, axis=-1), 1.0, rtol=1e-6)
  assert (shared @ shared.T)[off_diagonal].min() > 0.8
  rand = unit_rows_init(jax.random.key(0), (k, m))
  assert abs(float((rand @ rand.T)[off_diagonal].mean())) < 0.1
  config = load_config("pn")
  config.model.code_init = "shared"
  E = nn.unbox(init_params(build_model(config.model), jax.random.key(1)))["E"]
  assert (E @ E.T)[~np.eye(len(E), dtype=bool)].min() > 0.8
  config.model.code_spread = 1.0  # model.code_spread: codes start further apart
  E = nn.unbox(init_params(build_model(config.model), jax.random.key(1)))["E"]
  np.testing.assert_allclose(jnp.linalg.norm(E, axis=-1), 1.0, rtol=1e-5)
  assert float((E @ E.T)[~np.eye(len(E), dtype=bool)].mean()) < 0.7
