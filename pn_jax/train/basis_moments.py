"""Adam for the PN's shared basis T in fewer bytes per step (`optim.basis_moments`).

Why: T holds ~90% of a PN's parameters (1.3B of 1.43B at GPT-2-small shape), and float32 AdamW
reads and writes both of its moments every step: at HBM bandwidth that pass is the largest part
of what a PN step costs beyond a dense one (docs/benchmarks.md). Every other parameter keeps
float32 Adam; the update is the same `mu_hat / (sqrt(nu_hat) + eps)` of optax.scale_by_adam.

  float32   optax.adamw for every leaf (the default: the optimizer state saved runs have).
  bfloat16  T's two moments stored in bfloat16: half their bytes. Each EMA is computed in
            float32 and stochastically rounded back, so an increment below bfloat16's resolution
            ((1 - b2) g^2 against nu, once gradients shrink) survives in expectation instead of
            being rounded away every step.
  factored  T's second moment factored over each basis slice's two matrix axes (Adafactor's
            row and column EMAs, Shazeer & Stern 2018: a [.., D, F, h] tensor keeps [.., D, 1, h]
            and [.., 1, F, h]) and its first moment in bfloat16 as above: a quarter of float32
            Adam's moment bytes.

With `model.basis_dtype=bfloat16` T itself is stored in bfloat16 (no float32 master copy), which
halves what forming, T's gradient and this pass read and write; `apply_updates` then adds each
update in float32 and rounds stochastically, so updates far below bfloat16's resolution (lr 1e-4
against weights ~0.02) still move T in expectation (Zamirai et al. 2020, "Revisiting BFloat16
Training"). Any moments option works with it: their dtypes do not follow the parameter's.

Rounding noise is a hash of each element's index, the step count and the leaf (no PRNG key in
the state, no extra pass over T): the same run rounds the same way, and a resumed run too.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from pn_jax.config import BASIS_MOMENTS

BASIS = ("T_in", "T_out", "T_gate")  # the PN's shared basis tensors (pn_jax/model/mlp.py)
_ROW, _COL = -2, -3  # a basis slice [.., a, b, h]: the row EMA averages over b, the column over a


class BasisAdamState(NamedTuple):
  count: jax.Array  # int32 scalar
  mu: Any  # per leaf: like the parameter; bfloat16 for a basis leaf
  nu: Any  # per leaf: like the parameter; bfloat16 (bfloat16) or a (row, col) pair (factored)


def is_basis(path) -> bool:
  """A pytree path to one of the PN's (or mixture's) basis tensors T."""
  return getattr(path[-1], "key", None) in BASIS


def _is_box(x) -> bool:
  return isinstance(x, nn.meta.AxisMetadata)


def _zeros(p, dtype, mean_axis: int | None = None):
  """Zeros shaped like `p` (averaged over `mean_axis`, kept as size 1); a boxed parameter gives a
  boxed state with the same logical axes, none on the averaged one (it cannot be sharded)."""
  value = p.unbox(apply_constraint=False) if _is_box(p) else p
  shape = list(value.shape)
  if mean_axis is not None:
    shape[mean_axis] = 1
  zeros = jnp.zeros(shape, dtype)
  if not _is_box(p):
    return zeros
  names = list(p.names)
  if mean_axis is not None:
    names[mean_axis] = None
  return p.replace(value=zeros, names=tuple(names))


def stochastic_round_bf16(x: jax.Array, salt: jax.Array) -> jax.Array:
  """float32 -> bfloat16, rounding up with probability equal to the dropped fraction (unbiased).

  bfloat16 is the upper 16 bits of a float32, so adding uniform noise in [0, 2^16) to the bits
  and truncating rounds the magnitude up with exactly that probability (sign-magnitude: the
  same for negative values). The noise is a multiply-xorshift hash of (element index, salt)."""
  bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
  index = jnp.zeros(x.shape, jnp.uint32)
  stride = 1
  for axis in reversed(range(x.ndim)):
    index = index + jax.lax.broadcasted_iota(jnp.uint32, x.shape, axis) * np.uint32(stride)
    stride = (stride * x.shape[axis]) % (1 << 32)
  h = index * np.uint32(0x9E3779B1) + salt.astype(jnp.uint32) * np.uint32(0x85EBCA77)
  h = (h ^ (h >> 16)) * np.uint32(0x7FEB352D)
  h = (h ^ (h >> 15)) * np.uint32(0x846CA68B)
  h = h ^ (h >> 16)
  finite = jnp.isfinite(x)
  rounded = (bits + (h & np.uint32(0xFFFF))) & np.uint32(0xFFFF0000)
  out = jax.lax.bitcast_convert_type(rounded, jnp.float32)
  return jnp.where(finite, out, x).astype(jnp.bfloat16)


def scale_by_adam_basis(b1: float, b2: float, eps: float, moments: str
                        ) -> optax.GradientTransformation:
  """optax.scale_by_adam, with the basis leaves' moments stored as `moments` says."""
  if moments not in BASIS_MOMENTS:
    raise ValueError(f"basis moments {moments!r}: one of {BASIS_MOMENTS}")
  factored = moments == "factored"

  def init(params):
    def dtype(path, p):  # a basis leaf's moments: as `moments` says, whatever T's own dtype
      if not is_basis(path):
        return _dtype(p)
      return jnp.float32 if moments == "float32" else jnp.bfloat16

    def mu(path, p):
      return _zeros(p, dtype(path, p))

    def nu(path, p):
      if is_basis(path) and factored:
        return (_zeros(p, jnp.float32, _ROW), _zeros(p, jnp.float32, _COL))
      return _zeros(p, dtype(path, p))

    with_path = lambda f: jax.tree_util.tree_map_with_path(f, params, is_leaf=_is_box)
    return BasisAdamState(jnp.zeros((), jnp.int32), with_path(mu), with_path(nu))

  def update(updates, state, params=None):
    del params
    count = optax.safe_increment(state.count)
    c1 = 1 - b1 ** count.astype(jnp.float32)
    c2 = 1 - b2 ** count.astype(jnp.float32)
    paths, treedef = jax.tree_util.tree_flatten_with_path(updates)
    mus, nus = treedef.flatten_up_to(state.mu), treedef.flatten_up_to(state.nu)
    out_u, out_mu, out_nu = [], [], []
    for leaf, ((path, g), mu, nu) in enumerate(zip(paths, mus, nus)):
      g32 = g.astype(jnp.float32)
      mu32 = b1 * mu.astype(jnp.float32) + (1 - b1) * g32
      if is_basis(path) and factored:
        g2 = g32 * g32 + 1e-30  # Adafactor's epsilon_1: a zero row must not divide by zero
        row = b2 * nu[0] + (1 - b2) * jnp.mean(g2, axis=_ROW, keepdims=True)
        col = b2 * nu[1] + (1 - b2) * jnp.mean(g2, axis=_COL, keepdims=True)
        nu32 = row * col / jnp.mean(row, axis=_COL, keepdims=True)
        new_nu = (row, col)
      else:
        nu32 = b2 * nu.astype(jnp.float32) + (1 - b2) * g32 * g32
        new_nu = nu32
      out_u.append(((mu32 / c1) / (jnp.sqrt(nu32 / c2) + eps)).astype(g.dtype))
      if is_basis(path) and moments != "float32":
        salt = count * np.int32(2 * len(paths)) + np.int32(2 * leaf)
        mu32 = stochastic_round_bf16(mu32, salt)
        if not factored:
          new_nu = stochastic_round_bf16(nu32, salt + 1)
      out_mu.append(mu32.astype(mu.dtype))
      out_nu.append(new_nu if isinstance(new_nu, tuple) else new_nu.astype(nu.dtype))
    unflat = lambda leaves: jax.tree_util.tree_unflatten(treedef, leaves)
    return unflat(out_u), BasisAdamState(count, unflat(out_mu), unflat(out_nu))

  return optax.GradientTransformation(init, update)


def _dtype(p):
  return (p.unbox(apply_constraint=False) if _is_box(p) else p).dtype


def apply_updates(params, updates, step: jax.Array):
  """optax.apply_updates, except that a bfloat16 basis leaf (model.basis_dtype) gets p + u in
  float32, stochastically rounded: rounding to nearest would drop every update smaller than half
  a bfloat16 step of the weight, i.e. most of them late in training.

  `step` (the update's int32 count) salts the noise: each step and leaf draws afresh, the same
  run the same way. The salts are negative, apart from the moments' (which count up from 0)."""
  paths, treedef = jax.tree_util.tree_flatten_with_path(params)
  out = []
  for leaf, ((path, p), u) in enumerate(zip(paths, treedef.flatten_up_to(updates))):
    if is_basis(path) and p.dtype == jnp.bfloat16:
      salt = -(step.astype(jnp.int32) * np.int32(len(paths)) + np.int32(leaf)) - 1
      out.append(stochastic_round_bf16(p.astype(jnp.float32) + u.astype(jnp.float32), salt))
    else:
      out.append(jnp.asarray(p + u).astype(p.dtype))  # optax.apply_updates
  return jax.tree_util.tree_unflatten(treedef, out)
