"""Train state and its sharded creation.

The abstract (shape-only) state, with logical axes still attached, is the single source of truth:
it gives the NamedShardings for init, for the jitted step, and for restoring a checkpoint onto
whatever mesh the current run has (jax-llm-examples style).
"""

from __future__ import annotations

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from pn_jax.model.transformer import init_params
from pn_jax.parallel.mesh import tree_shardings


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: number of updates applied
  params: Any
  opt_state: Any


def _init_boxed(model, tx, rng):
  params = init_params(model, rng)  # nn.Partitioned leaves
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))


def state_shardings(model, tx, mesh, rules):
  """-> (abstract unboxed state [ShapeDtypeStruct with .sharding], sharding tree)."""
  # The key is made inside the trace: a concrete one would be placed on the mesh's devices,
  # which a compile-only TPU mesh (pn_jax/aot.py) cannot hold.
  boxed = jax.eval_shape(lambda: _init_boxed(model, tx, jax.random.key(0)))
  shardings = tree_shardings(boxed, mesh, rules)
  is_box = lambda x: isinstance(x, nn.meta.AxisMetadata)
  plain = jax.tree.map(lambda x: x.unbox(apply_constraint=False) if is_box(x) else x, boxed,
                       is_leaf=is_box)
  abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                          plain, shardings)
  return abstract, shardings


def create_state(model, tx, mesh, rules, rng, params=None) -> tuple[TrainState, Any]:
  """Initialises params (or takes `params`, e.g. a projected model) and a fresh optimizer state
  directly into their shardings."""
  _, shardings = state_shardings(model, tx, mesh, rules)
  if params is None:
    init = jax.jit(lambda r: nn.unbox(_init_boxed(model, tx, r)), out_shardings=shardings)
    return init(rng), shardings
  params = jax.device_put(params, shardings.params)
  start = jax.jit(lambda p: TrainState(step=jnp.zeros((), jnp.int32), params=p,
                                       opt_state=tx.init(p)), out_shardings=shardings)
  return start(params), shardings
