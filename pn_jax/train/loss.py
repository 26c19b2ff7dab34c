"""Masked next-token cross-entropy, optionally chunked over the sequence.

Chunking computes the [B, c, V] logits of one chunk at a time inside a rematerialised scan, so
the full [B, T, V] float32 logits are never live at once (nor saved for the backward pass).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def xent_sum_reference(hidden_BTD: Array, unembed_DV: Array, targets_BT: Array,
                       mask_BT: Array) -> Array:
  """Plain autodiff version (the fused one below is tested against it)."""
  logits = jnp.einsum("BTD,DV->BTV", hidden_BTD, unembed_DV).astype(jnp.float32)
  logz = jax.nn.logsumexp(logits, axis=-1)
  target_logit = jnp.take_along_axis(logits, targets_BT[..., None], axis=-1)[..., 0]
  return jnp.sum((logz - target_logit) * mask_BT)


@jax.custom_vjp
def _xent_sum(hidden_BTD: Array, unembed_DV: Array, targets_BT: Array, mask_BT: Array) -> Array:
  """Sum of masked token losses with a hand-written backward pass.

  Autodiff of the reference keeps float32 logits for the backward pass and writes the softmax
  gradient in several passes; here the forward keeps only the compute-dtype logits and log Z,
  and the backward forms (softmax - onehot) * mask in one elementwise pass before the two
  matmuls. Same math, same precision (logits are rounded to the compute dtype either way).
  """
  return _xent_fwd(hidden_BTD, unembed_DV, targets_BT, mask_BT)[0]


def _xent_fwd(hidden_BTD, unembed_DV, targets_BT, mask_BT):
  logits_BTV = jnp.einsum("BTD,DV->BTV", hidden_BTD, unembed_DV)
  logz_BT = jax.nn.logsumexp(logits_BTV.astype(jnp.float32), axis=-1)
  target_BT = jnp.take_along_axis(logits_BTV, targets_BT[..., None], axis=-1)[..., 0]
  total = jnp.sum((logz_BT - target_BT.astype(jnp.float32)) * mask_BT)
  return total, (hidden_BTD, unembed_DV, logits_BTV, logz_BT, targets_BT, mask_BT)


def _xent_bwd(res, g):
  hidden_BTD, unembed_DV, logits_BTV, logz_BT, targets_BT, mask_BT = res
  probs_BTV = jnp.exp(logits_BTV.astype(jnp.float32) - logz_BT[..., None])
  onehot_BTV = jax.lax.broadcasted_iota(jnp.int32, logits_BTV.shape, 2) == targets_BT[..., None]
  dlogits_BTV = ((probs_BTV - onehot_BTV) * (mask_BT * g)[..., None]).astype(logits_BTV.dtype)
  d_hidden = jnp.einsum("BTV,DV->BTD", dlogits_BTV, unembed_DV).astype(hidden_BTD.dtype)
  d_unembed = jnp.einsum("BTD,BTV->DV", hidden_BTD, dlogits_BTV).astype(unembed_DV.dtype)
  return d_hidden, d_unembed, None, None


_xent_sum.defvjp(_xent_fwd, _xent_bwd)


def cross_entropy(hidden_BTD: Array, unembed_DV: Array, targets_BT: Array, mask_BT: Array,
                  chunk: int = 0) -> tuple[Array, Array]:
  """-> (sum of token losses, number of target tokens), both float32 scalars."""
  with jax.named_scope("cross_entropy"):  # names the CE's kernels in profiles (pn_jax.bench)
    return _cross_entropy(hidden_BTD, unembed_DV, targets_BT, mask_BT, chunk)


def _cross_entropy(hidden_BTD, unembed_DV, targets_BT, mask_BT, chunk):
  mask_BT = mask_BT.astype(jnp.float32)
  weight = jnp.sum(mask_BT)
  T = hidden_BTD.shape[1]
  if not chunk or chunk >= T:
    return _xent_sum(hidden_BTD, unembed_DV, targets_BT, mask_BT), weight

  n = T // chunk
  split = lambda a: jnp.moveaxis(a.reshape(a.shape[0], n, chunk, *a.shape[2:]), 1, 0)
  xs = (split(hidden_BTD), split(targets_BT), split(mask_BT))

  @jax.checkpoint
  def body(total, x):
    h, t, m = x
    return total + _xent_sum(h, unembed_DV, t, m), None

  total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), xs)
  return total, weight
