"""A run must not write into the runs it reads: --workdir apart from init_from and the teacher.

Specializing with --workdir equal to config.init_from "resumed" from the pretraining checkpoint,
wrote fine-tuning checkpoints into the pretraining run and garbage-collected its checkpoint; one
nested in the other mixes their files the same way. Paths are compared resolved (symlinks,
relative paths, trailing slashes), before anything is written.
"""

from __future__ import annotations

import os
import posixpath

from pn_jax.config import ConfigError


def resolved(path: str) -> str:
  """The real path of a local path (it need not exist yet); an object-store URL normalised."""
  if "://" in path:
    scheme, _, rest = path.partition("://")
    return f"{scheme}://{posixpath.normpath(rest)}"
  return os.path.realpath(os.path.expanduser(path))


def nested(a: str, b: str) -> bool:
  """Whether resolved paths `a` and `b` are equal or one lies inside the other."""
  return a == b or a.startswith(b.rstrip("/") + "/") or b.startswith(a.rstrip("/") + "/")


def check_apart(workdir: str, sources: dict[str, str]) -> None:
  """ConfigError if --workdir is, contains or lies inside any of `sources` ({what it is, e.g.
  "config.init_from": path}; empty paths are skipped)."""
  mine = resolved(workdir)
  for key, path in sources.items():
    if not path:
      continue
    theirs = resolved(path)
    if not nested(mine, theirs):
      continue
    how = ("is" if mine == theirs else "lies inside" if mine.startswith(theirs + "/")
           else "contains")
    raise ConfigError(f"--workdir {workdir} ({mine}) {how} {key}={path} ({theirs}): a "
                      f"run must not write into the run it reads; choose a --workdir outside "
                      f"{theirs} (e.g. a sibling directory) that does not contain it either")
