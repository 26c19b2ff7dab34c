"""A dense model as safetensors + a JSON config (what the export mode writes), and loaded back.

`save` writes <dir>/{model.safetensors, config.json, tokenizer.model}, all at once:
an earlier export is replaced, anything else at that path refused (ExportError). Tensor names are
the flax param paths joined by "." (e.g. "blocks.attn.wq", stacked over layers on axis 0); the JSON
holds the model config that pn_jax.model.transformer.LM needs, so `load(dir)` rebuilds the model
and reproduces the checkpoint's logits exactly (tests/test_export.py). `write_export` (the
all-at-once directory write and the refusal of foreign paths) serves pn_jax/hf_export.py too.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Callable

import jax
import ml_collections
import numpy as np
from flax import traverse_util
from safetensors.numpy import load_file, save_file

from pn_jax import storage
from pn_jax.model.model_config import ModelConfig
from pn_jax.model.transformer import LM
from pn_jax.train.preflight import WorkdirError

FORMAT = "pn-jax-dense-lm/1"
WEIGHTS, CONFIG, TOKENIZER = "model.safetensors", "config.json", "tokenizer.model"
EXPORT_FILES = (WEIGHTS, CONFIG, TOKENIZER)  # what `save` writes
_NEW, _OLD = ".new-", ".old-"  # <parent>/.<name>.new-XXXX: being written; .old-XXXX: replaced


def flatten(params) -> dict[str, np.ndarray]:
  flat = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    flat[".".join(str(k.key) for k in path)] = np.asarray(jax.device_get(leaf))
  return flat


class ExportError(WorkdirError):
  """The export path holds something other than a pn-jax export: it is never replaced."""


def check_target(out_dir: str, names=EXPORT_FILES, fmt: str = FORMAT) -> None:
  """ExportError unless `out_dir` is absent or an earlier export of format `fmt` (a directory
  holding only files of `names`, its config.json declaring `fmt`), which is derived output and
  replaced."""
  if not os.path.lexists(out_dir):
    return
  if os.path.islink(out_dir) or not os.path.isdir(out_dir):
    what = "a symlink" if os.path.islink(out_dir) else "a file"
  else:
    foreign = sorted(set(os.listdir(out_dir)) - set(names))
    what = _config_problem(out_dir, fmt) or (foreign and f"a directory holding {foreign[:5]}")
    if not what:
      return
  raise ExportError(f"the export path {out_dir} exists and is not a pn-jax export ({what}); "
                    "move it aside or delete it, then export again")


def export_format(info: dict):
  """The export format a config.json declares: its "format" (this module's layout) or, in a
  transformers config (pn_jax/hf_export.py), the "format" of its "pn_jax" entry."""
  entry = info.get("pn_jax")
  return entry.get("format") if isinstance(entry, dict) else info.get("format")


def _config_problem(out_dir: str, fmt: str) -> str:
  """'' if out_dir has no config.json or one of format `fmt`; else what is wrong with it."""
  path = os.path.join(out_dir, CONFIG)
  if not os.path.exists(path):
    return ""
  try:
    with open(path) as f:
      found = export_format(json.load(f))
  except (OSError, ValueError, AttributeError) as e:
    return f"an unreadable {CONFIG}: {type(e).__name__}"
  return "" if found == fmt else f"a {CONFIG} of format {found!r}"


def save(out_dir: str, params, model_cfg: ml_collections.ConfigDict, *, tokenizer_path: str = "",
         metadata: dict | None = None) -> str:
  """Writes the export (write_export: all at once, an earlier export replaced)."""
  flat = flatten(params)

  def write(new: str) -> None:
    save_file(flat, os.path.join(new, WEIGHTS), metadata={"format": FORMAT})
    info = {"format": FORMAT, "model": model_cfg.to_dict(), **(metadata or {})}
    if tokenizer_path and os.path.exists(tokenizer_path):
      shutil.copyfile(tokenizer_path, os.path.join(new, TOKENIZER))
      info["tokenizer"] = TOKENIZER
    with open(os.path.join(new, CONFIG), "w") as f:
      json.dump(info, f, indent=1, default=float)

  return write_export(out_dir, write, needed=sum(a.nbytes for a in flat.values()))


def write_export(out_dir: str, write: Callable[[str], None], names=EXPORT_FILES,
                 fmt: str = FORMAT, needed: int | None = None) -> str:
  """Refuses `out_dir` unless check_target(out_dir, names, fmt) passes, then has `write(new)`
  fill a new directory beside `out_dir` and renames it into place: a reader finds the earlier
  complete export or the new one, never a mix (and a failure leaves the earlier one). Files are
  0644 and the directory 0755, whatever the writing libraries chose. A full disk (about `needed`
  bytes of weights) is an OutOfSpace error; the new directory is removed."""
  check_target(out_dir, names, fmt)
  parent, name = os.path.split(os.path.abspath(out_dir))
  os.makedirs(parent, exist_ok=True)
  _remove_leftovers(parent, name)
  new = tempfile.mkdtemp(prefix=f".{name}{_NEW}", dir=parent)
  try:
    with storage.writing(out_dir, needed=needed):
      write(new)
      for path, mode in [(os.path.join(new, e), 0o644) for e in os.listdir(new)] + [(new, 0o755)]:
        os.chmod(path, mode)
        _fsync(path)  # on disk before the rename that publishes it
      _publish(new, os.path.join(parent, name))
  finally:
    shutil.rmtree(new, ignore_errors=True)  # (gone already once published)
  return out_dir


def _fsync(path: str) -> None:
  fd = os.open(path, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


def _publish(new: str, out_dir: str) -> None:
  """Renames `new` to `out_dir`; an earlier export there is renamed aside first, then deleted
  (restored if the second rename fails). The directory renames are atomic; between the two, for
  an instant, there is no export at all (a kill there leaves both under their temporary names,
  cleaned up by the next export)."""
  old = None
  if os.path.lexists(out_dir):
    parent, name = os.path.split(out_dir)
    old = os.path.join(parent, f".{name}{_OLD}{os.path.basename(new).rsplit(_NEW, 1)[1]}")
    os.rename(out_dir, old)
  try:
    os.rename(new, out_dir)
  except BaseException:
    if old:
      os.rename(old, out_dir)
    raise
  _fsync(os.path.dirname(out_dir))
  if old:
    shutil.rmtree(old)


def _remove_leftovers(parent: str, name: str) -> None:
  """Temporary directories of an earlier export of `name` that was killed before finishing."""
  for entry in os.listdir(parent):
    if entry.startswith((f".{name}{_NEW}", f".{name}{_OLD}")):
      shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)


def load(out_dir: str) -> tuple[LM, dict, dict]:
  """-> (model, params (numpy), the JSON config)."""
  with open(os.path.join(out_dir, CONFIG)) as f:
    info = json.load(f)
  if info.get("format") != FORMAT:
    raise ValueError(f"{out_dir}/{CONFIG} has format {info.get('format')!r}, expected {FORMAT!r}")
  params = traverse_util.unflatten_dict(load_file(os.path.join(out_dir, WEIGHTS)), sep=".")
  return LM(ModelConfig.from_config(info["model"])), params, info
