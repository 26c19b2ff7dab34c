"""AdamW with linear warmup + cosine decay, global-norm clipping and a weight-decay mask."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
import optax

from pn_jax.train.basis_moments import is_basis, scale_by_adam_basis


def learning_rate_schedule(optim: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  decay_steps = optim.decay_steps or total_steps
  warmup = min(optim.warmup_steps, max(decay_steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=optim.lr, warmup_steps=warmup,
      decay_steps=max(decay_steps, warmup + 1), end_value=optim.lr * optim.min_lr_ratio)


CODES = ("E", "M")  # the PN's expert codes and per-layer maps (pn_jax/model)


def decay_mask(params, decay_codes: bool = True):
  """Decay matrices (and higher-rank tensors); leave norm scales and biases alone, and the PN's
  E and M too when not `decay_codes`.

  Stacked layers add a leading axis, so rank is read relative to it: a scanned norm scale is
  [L, D] but still a vector per layer.
  """
  def decayed(path, leaf):
    if not decay_codes and getattr(path[-1], "key", None) in CODES:
      return False
    in_scan = any(getattr(k, "key", None) == "blocks" for k in path)
    return leaf.ndim - int(in_scan) >= 2
  return jax.tree_util.tree_map_with_path(decayed, params)


def scale_basis_updates(scale: float) -> optax.GradientTransformation:
  """Multiplies the updates of the PN's shared basis tensors (T_in, T_out, T_gate) by `scale`.

  Why: Adam moves every element of T by about lr per step, and a projected weight is
  W = sum_r c_r T_r with |c|_2 = 1 (c = E[i] M), so W moves by about lr * |c|_1, up to
  sqrt(h) times a dense weight's step. `scale` ~ 1/sqrt(h) gives W the dense model's step.
  Measured (docs/results.md, k=4 h=8 m=4, CPU scale): 1/sqrt(h) made the PN worse, generic
  perplexity 94.1 vs 84.5 after 600k tokens and 43.9 vs 38.0 after 3M, so the default is 1.
  """
  def scale_tree(updates, params=None):
    del params
    return jax.tree_util.tree_map_with_path(
        lambda path, u: u * scale if is_basis(path) else u, updates)
  return optax.stateless(scale_tree)


def global_norm(tree) -> jax.Array:
  """optax.tree.norm with every square summed in float32: a bfloat16 gradient (the basis T with
  model.basis_dtype=bfloat16) would otherwise sum its ~1e9 squares in bfloat16. For float32
  leaves it is optax's computation, value for value."""
  sums = jax.tree.map(lambda g: jnp.sum(jnp.square(g.astype(jnp.float32))), tree)
  return jnp.sqrt(jax.tree.reduce(lambda a, b: a + b, sums, initializer=0))


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
  """optax.clip_by_global_norm on `global_norm` (float32 sums): t unchanged below max_norm,
  else t / norm * max_norm, in t's dtype. Stateless, like optax's: saved states are unchanged."""
  def clip(updates, params=None):
    del params
    norm = global_norm(updates)
    keep = norm < max_norm
    return jax.tree.map(
        lambda t: jax.lax.select(keep, t, (t / norm.astype(t.dtype)) * max_norm), updates)
  return optax.stateless(clip)


def per_expert(tx: optax.GradientTransformation) -> optax.GradientTransformation:
  """`tx` applied independently to each slice of every leaf's leading (expert) axis.

  Independent experts (pn_jax/model/independent_experts.py) are k separate runs: each clips its own
  gradient norm, keeps its own Adam moments and step count, and (nan_policy='skip') skips its
  own non-finite updates, so no expert's update depends on another's gradient.
  """
  def update(updates, state, params=None):
    return jax.vmap(tx.update)(updates, state, params)
  return optax.GradientTransformation(jax.vmap(tx.init), update)


def make_optimizer(config: ml_collections.ConfigDict, total_steps: int | None = None):
  """-> (optax transformation, schedule). `train.nan_policy='skip'` drops non-finite updates;
  independent experts get one optimizer each (`per_expert`)."""
  o = config.optim
  schedule = learning_rate_schedule(o, total_steps or config.train.steps)
  mask = functools.partial(decay_mask, decay_codes=o.decay_codes)
  if o.basis_moments == "float32":  # optax.adamw: the optimizer state every saved run has
    adamw = [optax.adamw(schedule, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay,
                         mask=mask)]
  else:  # optax.adamw's chain, T's moments in fewer bytes (pn_jax/train/basis_moments.py)
    adamw = [scale_by_adam_basis(o.b1, o.b2, o.eps, o.basis_moments),
             optax.add_decayed_weights(o.weight_decay, mask),
             optax.scale_by_learning_rate(schedule)]
  parts = [clip_by_global_norm(o.clip_norm), *adamw]
  if o.basis_lr_scale != 1.0:  # only then: existing runs' optimizer state keeps its structure
    parts.append(scale_basis_updates(o.basis_lr_scale))
  tx = optax.chain(*parts)
  if config.train.nan_policy == "skip":
    tx = optax.apply_if_finite(tx, max_consecutive_errors=1_000_000)
  if config.model.get("independent_experts", False):
    tx = per_expert(tx)
  return tx, schedule
