"""The PN basis's Adam moments in fewer bytes (optim.basis_moments): the same update as float32
Adam where the math says so, unbiased rounding, clear refusals."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import load_config
from pn_jax.config import ConfigError, validate
from pn_jax.train.basis_moments import (BasisAdamState, scale_by_adam_basis,
                                        stochastic_round_bf16)
from pn_jax.train.optimizer import make_optimizer

B1, B2, EPS = 0.9, 0.95, 1e-8


def _tree(rng, D=16, F=24, h=4):
  """A PN-shaped tree: a scanned basis [L, D, F, h] beside ordinary leaves."""
  return {"blocks": {"mlp": {"T_in": rng.normal(size=(2, D, F, h)).astype(np.float32),
                             "M": rng.normal(size=(2, 3, h)).astype(np.float32)}},
          "embed": rng.normal(size=(10, D)).astype(np.float32)}


def _run(tx, grads_list, params):
  state, out = tx.init(params), []
  for g in grads_list:
    u, state = jax.jit(tx.update)(g, state)
    out.append(u)
  return out, state


def test_float32_moments_are_optax_scale_by_adam():
  """The shared update math: with float32 storage it is optax.scale_by_adam to rounding."""
  rng = np.random.default_rng(0)
  params = _tree(rng)
  grads = [jax.tree.map(lambda p: rng.normal(size=p.shape).astype(np.float32), params)
           for _ in range(4)]
  ours, _ = _run(scale_by_adam_basis(B1, B2, EPS, "float32"), grads, params)
  want, _ = _run(optax.scale_by_adam(B1, B2, EPS), grads, params)
  for a, b in zip(ours, want):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7), a, b)


def test_stochastic_rounding_is_unbiased_and_lands_on_neighbours():
  lo, hi = 1.0, 1.0 + 2.0 ** -7  # neighbouring bfloat16 values
  for sign in (1.0, -1.0):
    x = jnp.full((1 << 16,), sign * (lo + 0.25 * (hi - lo)), jnp.float32)
    r = np.asarray(stochastic_round_bf16(x, jnp.int32(3)).astype(jnp.float32))
    assert set(np.unique(np.abs(r))) == {lo, hi}
    # mean = x within 4 standard errors of a Bernoulli(0.25) over 65536 draws
    assert abs(np.mean(r) - float(x[0])) < 4 * (hi - lo) * np.sqrt(0.25 * 0.75 / x.size)
  special = jnp.array([jnp.inf, -jnp.inf, jnp.nan, 0.0, 2.0], jnp.float32)
  got = np.asarray(stochastic_round_bf16(special, jnp.int32(0)).astype(jnp.float32))
  np.testing.assert_array_equal(got[[0, 1, 3, 4]], [np.inf, -np.inf, 0.0, 2.0])
  assert np.isnan(got[2])
  other = stochastic_round_bf16(x, jnp.int32(4))  # another salt: other draws
  assert not np.array_equal(np.asarray(other), np.asarray(stochastic_round_bf16(x, jnp.int32(3))))


def test_factored_second_moment_is_exact_for_rank_one_squared_gradients():
  """g[l, a, b, r] = u[a] v[b] w[r]: g^2 is rank one per slice, so the row/column factors give
  Adam's second moment exactly, and the first updates agree; the state is [.., D, 1, h] and
  [.., 1, F, h] in float32, the first moment bfloat16."""
  rng = np.random.default_rng(1)
  params = _tree(rng)
  u, v, w = rng.normal(size=16), rng.normal(size=24), rng.normal(size=4)
  g_T = np.broadcast_to((u[:, None, None] * v[None, :, None] * w)[None], (2, 16, 24, 4))
  grads = jax.tree.map(lambda p: rng.normal(size=p.shape).astype(np.float32), params)
  grads["blocks"]["mlp"]["T_in"] = np.ascontiguousarray(g_T, np.float32)
  ours, state = _run(scale_by_adam_basis(B1, B2, EPS, "factored"), [grads], params)
  want, _ = _run(optax.scale_by_adam(B1, B2, EPS), [grads], params)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6), ours[0],
               want[0])
  row, col = state.nu["blocks"]["mlp"]["T_in"]
  assert row.shape == (2, 16, 1, 4) and col.shape == (2, 1, 24, 4) and row.dtype == jnp.float32
  assert state.mu["blocks"]["mlp"]["T_in"].dtype == jnp.bfloat16
  assert state.mu["blocks"]["mlp"]["M"].dtype == jnp.float32  # not a basis leaf
  assert state.nu["embed"].dtype == jnp.float32


def test_bfloat16_moments_follow_float32_adam_over_many_steps():
  """60 steps of noisy gradients: the bfloat16-stored moments' updates stay within ~1% of
  float32 Adam's (stochastic rounding keeps the EMAs unbiased)."""
  rng = np.random.default_rng(2)
  params = _tree(rng)
  scale = jax.tree.map(lambda p: rng.uniform(0.1, 10.0, size=p.shape).astype(np.float32), params)
  grads = [jax.tree.map(lambda s: (s * (1 + 0.3 * rng.normal(size=s.shape))).astype(np.float32),
                        scale) for _ in range(60)]
  ours, state = _run(scale_by_adam_basis(B1, B2, EPS, "bfloat16"), grads, params)
  want, _ = _run(optax.scale_by_adam(B1, B2, EPS), grads, params)
  assert state.nu["blocks"]["mlp"]["T_in"].dtype == jnp.bfloat16
  a, b = ours[-1]["blocks"]["mlp"]["T_in"], want[-1]["blocks"]["mlp"]["T_in"]
  assert float(jnp.mean(jnp.abs(a - b) / jnp.abs(b))) < 0.01


def test_basis_moments_config_is_checked():
  config = load_config("pn")
  config.optim.basis_moments = "int8"
  with pytest.raises(ConfigError, match="optim.basis_moments: unknown 'int8'"):
    validate(config)
  slm = load_config("slm")
  slm.optim.basis_moments = "factored"
  with pytest.raises(ConfigError, match="optim.basis_moments: .*mlp_kind='dense' and has none"):
    validate(slm)
  config.optim.basis_moments = "factored"
  validate(config)
  tx, _ = make_optimizer(config)
  state = tx.init({"T_in": jnp.zeros((2, 3, 4, 5)), "w": jnp.zeros((3, 3))})
  found = [s for s in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, BasisAdamState))
           if isinstance(s, BasisAdamState)]
  assert len(found) == 1 and found[0].mu["T_in"].dtype == jnp.bfloat16


def test_rounding_noise_does_not_depend_on_the_sharding():
  """The noise hashes each element's global index: a basis sharded over 8 devices rounds
  exactly as on one (so sharded runs equal unsharded ones from the second step on)."""
  from jax.sharding import NamedSharding, PartitionSpec as P
  x = jnp.asarray(np.random.default_rng(3).normal(size=(2, 8, 16, 4)), jnp.float32)
  mesh = jax.make_mesh((2, 4), ("fsdp", "tensor"), devices=jax.devices()[:8])
  sharded = jax.device_put(x, NamedSharding(mesh, P(None, "fsdp", "tensor", None)))
  one = jax.jit(stochastic_round_bf16)(x, jnp.int32(7))
  many = jax.jit(stochastic_round_bf16)(sharded, jnp.int32(7))
  assert len(many.sharding.device_set) == 8
  np.testing.assert_array_equal(np.asarray(many.astype(jnp.float32)),
                                np.asarray(one.astype(jnp.float32)))
