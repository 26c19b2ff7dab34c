"""Checks before the first step: fail with a clear error now, not at the first checkpoint.

A workdir that cannot be written (read-only mount, a path under a file, no permission) or whose
filesystem cannot hold a checkpoint would otherwise surface as an OSError deep inside orbax after
data preparation and compilation, or worse as a run that trains for hours and cannot save. A mesh
that does not divide a parameter would surface as one IndivisibleError from inside jit.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import jax
import numpy as np

from pn_jax.config import ConfigError

# A new checkpoint is written next to the previous one (which is deleted only after the new one
# commits), so the free space needed is one state plus headroom: 2x the state.
SPACE_FACTOR = 2.0


class WorkdirError(RuntimeError):
  """The run directory cannot be created or written, or lacks space for checkpoints."""


def _size(n: float) -> str:
  return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def state_bytes(abstract_state) -> int:
  """Global bytes of every array in a (possibly abstract) tree: params + optimizer state."""
  return int(sum(np.prod(x.shape, dtype=np.int64) * np.dtype(x.dtype).itemsize
                 for x in jax.tree.leaves(abstract_state) if hasattr(x, "shape")))


def check_writable(workdir: str, flag: str = "--workdir") -> str:
  """Creates `workdir` if needed and writes+removes a probe file there; -> its absolute path.
  `flag` names the directory in the error (--workdir, or the drivers' --root)."""
  path = os.path.abspath(workdir)
  try:
    os.makedirs(path, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path, prefix=".write_probe_") as f:
      f.write(b"pn-jax")
      f.flush()
      os.fsync(f.fileno())
  except OSError as e:
    where = e.filename or path
    raise WorkdirError(f"{flag} {path} is not writable ({e.strerror or e} at {where}); "
                       "choose a writable directory") from e
  return path


def check_space(workdir: str, need_bytes: int, *, factor: float = SPACE_FACTOR) -> None:
  """Raises WorkdirError if the workdir's filesystem has less than `factor` x need_bytes free."""
  need = int(need_bytes * factor)
  free = shutil.disk_usage(os.path.abspath(workdir)).free
  if free < need:
    raise WorkdirError(
        f"--workdir {os.path.abspath(workdir)}: its filesystem has {_size(free)} free but a "
        f"checkpoint needs about {_size(need)} ({factor:g} x {_size(need_bytes)} of params + "
        "optimizer state); free some space or choose another --workdir")


def check_shardings(abstract_params) -> None:
  """ConfigError naming every parameter whose dims a mesh axis does not divide.

  `validate` cannot know which model dims land on which mesh axes (config.mesh.rules decide), so
  this reads the resolved shardings; otherwise jit fails with an IndivisibleError per array.
  """
  problems = []
  for path, leaf in jax.tree_util.tree_flatten_with_path(abstract_params)[0]:
    sharding = getattr(leaf, "sharding", None)
    if not isinstance(sharding, jax.sharding.NamedSharding):
      continue
    for dim, (size, axes) in enumerate(zip(leaf.shape, sharding.spec)):
      axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
      parts = int(np.prod([sharding.mesh.shape[a] for a in axes]))
      if axes and size % parts:
        split = "x".join(f"{a}={sharding.mesh.shape[a]}" for a in axes)
        problems.append(f"params{jax.tree_util.keystr(path)} {tuple(leaf.shape)}: dim {dim} "
                        f"({size}) is split over mesh {split}")
  if problems:
    more = f"; and {len(problems) - 4} more" if len(problems) > 4 else ""
    raise ConfigError(f"config.mesh: {len(problems)} parameter(s) cannot be split evenly over "
                      f"the mesh: {'; '.join(problems[:4])}{more}; change the model sizes, "
                      "config.mesh or config.mesh.rules")


def check_workdir(workdir: str, abstract_state=None) -> None:
  """Writability, then (given the abstract train state) free space for its checkpoints."""
  if "://" in workdir:  # object stores (gs://, s3://): orbax checks these itself at save time
    return
  check_writable(workdir)
  if abstract_state is not None:
    check_space(workdir, state_bytes(abstract_state))
