"""Masked next-token cross-entropy, optionally chunked over the sequence.

Chunking computes the [B, c, V] logits of one chunk at a time inside a rematerialised scan, so
the full [B, T, V] float32 logits are never live at once (nor saved for the backward pass).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def _xent_sum(hidden_BTD: Array, unembed_DV: Array, targets_BT: Array, mask_BT: Array) -> Array:
  logits = jnp.einsum("BTD,DV->BTV", hidden_BTD, unembed_DV).astype(jnp.float32)
  logz = jax.nn.logsumexp(logits, axis=-1)
  target_logit = jnp.take_along_axis(logits, targets_BT[..., None], axis=-1)[..., 0]
  return jnp.sum((logz - target_logit) * mask_BT)


def cross_entropy(hidden_BTD: Array, unembed_DV: Array, targets_BT: Array, mask_BT: Array,
                  chunk: int = 0) -> tuple[Array, Array]:
  """-> (sum of token losses, number of target tokens), both float32 scalars."""
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
