"""Device mesh and logical-axis sharding (MaxText style).

Params and activations carry logical axis names (`embed`, `mlp`, `act_batch`, ...); the
config's `mesh.rules` maps each to mesh axes (`data`, `fsdp`, `tensor`). Changing the rules or
the mesh shape reshards the run without touching model code.
"""

from __future__ import annotations

import contextlib

import flax.linen as nn
import jax
import ml_collections
from jax.experimental import mesh_utils
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from pn_jax.config import MESH_AXES, ConfigError, mesh_shape

# Activations shard their batch over every data-parallel axis and nothing else by default.
ACTIVATION_RULES = (
    ("act_batch", ("data", "fsdp")),
    ("act_seq", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
)


def make_mesh(config: ml_collections.ConfigDict, devices=None) -> jax.sharding.Mesh:
  """The config's mesh over `devices` (default: all). On a multi-slice TPU topology the `data`
  axis spans the slices (its other factor and fsdp/tensor stay inside each slice's ICI)."""
  devices = jax.devices() if devices is None else devices
  sizes = mesh_shape(config, len(devices))
  shape = tuple(sizes[a] for a in MESH_AXES)
  slices = len({getattr(d, "slice_index", 0) for d in devices})
  if slices == 1:
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                         devices=devices)
  if sizes["data"] % slices:
    raise ConfigError(f"config.mesh.data: {sizes['data']} must be a multiple of the "
                      f"{slices} slices (the data axis spans them)")
  per_slice = (sizes["data"] // slices, sizes["fsdp"], sizes["tensor"])
  grid = mesh_utils.create_hybrid_device_mesh(per_slice, (slices, 1, 1), devices)
  return jax.sharding.Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def logical_rules(config: ml_collections.ConfigDict) -> tuple:
  """The config's param rules plus the activation rules, as flax expects them."""
  rules = []
  for name, axes in config.mesh.rules.items():
    rules.append((name, tuple(axes) if isinstance(axes, (list, tuple)) else axes))
  return tuple(rules) + ACTIVATION_RULES


@contextlib.contextmanager
def activate(mesh: jax.sharding.Mesh, rules):
  """Mesh + logical rules in scope for tracing (with_logical_constraint needs both)."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    yield


def tree_shardings(boxed_tree, mesh, rules):
  """NamedShardings for a tree whose leaves may be nn.Partitioned (unboxed: replicated)."""
  specs = nn.get_partition_spec(boxed_tree)
  return nn.logical_to_mesh_sharding(specs, mesh, rules)


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  """Batches split their leading axis over the data-parallel axes."""
  return NamedSharding(mesh, P(("data", "fsdp")))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def global_batch(local_batch: dict, mesh: jax.sharding.Mesh) -> dict:
  """Per-process numpy batch -> globally sharded jax arrays (works for 1 or N processes).
  Values that already are global jax.Arrays (e.g. the inputs and soft targets of a teacher run
  on the devices, pn_jax/specialize/distill.py) pass through."""
  sharding = batch_sharding(mesh)
  return {k: v if isinstance(v, jax.Array) else
          jax.make_array_from_process_local_data(sharding, v) for k, v in local_batch.items()}
