"""Orbax checkpoints: params, optimizer state, config, data-iterator state and the loop's
progress (early stopping, training seconds), by step.

Orbax writes each step to a temporary directory and renames it when complete, so a crash
mid-save never leaves a checkpoint that `latest_step` would pick. Restores go through an abstract
target carrying the *current* mesh's shardings, so a run saved on 8 devices restores on 1.
The specialize stage restores the `params` item alone.
"""

from __future__ import annotations

import contextlib
import json
import os

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp

from pn_jax import storage


class CheckpointError(RuntimeError):
  """A checkpoint that is missing, unreadable, or belongs to a different model."""


class MissingStep(CheckpointError):
  """A step asked for by number that the run did not save (or no longer keeps)."""

  def __init__(self, message: str, steps: list[int]):
    super().__init__(message)
    self.steps = steps


class CorruptCheckpoint(CheckpointError):
  """A saved step that cannot be read (a torn or missing file). `detail`: what failed;
  `others`: the run's other steps. The message says how to resume this run past it; a run that
  only reads it (specialize's init_from) says how to pick another step instead."""

  def __init__(self, message: str, step: int, detail: str, others: list[int]):
    super().__init__(message)
    self.step, self.detail, self.others = step, detail, others


def _brief(e: Exception) -> str:
  """One line of an orbax/tensorstore error, without the multi-kB tensorstore spec dump."""
  text = " ".join(str(e).split("[tensorstore_spec=")[0].split())
  return f"{type(e).__name__}: {text[:400]}"


def storage_failure(e: BaseException) -> str | None:
  """'No space left on device (errno 28)' if `e` (or what caused it) is the filesystem refusing
  a write, else None. tensorstore reports those as ValueError('RESOURCE_EXHAUSTED: ... [os_error_
  code='28']'), raised from orbax's background threads, not as OSError (storage.error_code)."""
  code = storage.error_code(e)
  return None if code is None else f"{os.strerror(code)} (errno {code})"


def _shape_tree(tree) -> dict[str, tuple]:
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {jax.tree_util.keystr(path): tuple(leaf.shape) for path, leaf in flat}


def check_compatible(saved, expected, what: str) -> None:
  """Compares leaf shapes of two trees; raises CheckpointError naming every mismatch."""
  saved_shapes, expected_shapes = _shape_tree(saved), _shape_tree(expected)
  problems = []
  for key in sorted(set(saved_shapes) | set(expected_shapes)):
    a, b = saved_shapes.get(key), expected_shapes.get(key)
    if a != b:
      problems.append(f"  {key}: checkpoint {a if a is not None else 'missing'}, "
                      f"this config {b if b is not None else 'missing'}")
  if problems:
    shown = "\n".join(problems[:20]) + ("\n  ..." if len(problems) > 20 else "")
    raise CheckpointError(f"{what} does not match this config's model:\n{shown}")


class _KeepSteps:
  """An orbax preservation policy: keeps the checkpoints whose step is in `steps` (a set its
  Checkpointer updates)."""

  def __init__(self):
    self.steps: set[int] = set()

  def should_preserve(self, checkpoints, *, context) -> list[bool]:
    del context
    return [info.step in self.steps for info in checkpoints]


class Checkpointer:
  """One run's CheckpointManager under <workdir>/checkpoints: keeps the latest `keep` steps,
  and the step each save names as `keep_step` (see save)."""

  def __init__(self, workdir: str, *, keep: int = 3, async_save: bool = True,
               read_only: bool = False):
    self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
    self._kept = _KeepSteps()
    policy = ocp.checkpoint_managers.AnyPreservationPolicy(
        [ocp.checkpoint_managers.LatestN(n=keep), self._kept])
    # Read-only: the save settings orbax would reset itself (warning once per setting) are
    # given as it wants them (no saves, nothing to keep).
    options = ocp.CheckpointManagerOptions(
        preservation_policy=None if read_only else policy,
        save_interval_steps=0 if read_only else 1,
        create=not read_only, read_only=read_only,
        enable_async_checkpointing=async_save, cleanup_tmp_directories=not read_only)
    self.manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={"params": ocp.StandardCheckpointHandler(),
                       "opt_state": ocp.StandardCheckpointHandler(),
                       "config": ocp.JsonCheckpointHandler(),
                       "progress": ocp.JsonCheckpointHandler(),
                       "data": grain.checkpoint.CheckpointHandler()})
    self._async = async_save
    self._in_flight = None  # the last step handed to an async save, until it is known written
    self._last_keep = None  # the keep_step of the last save

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state, config: ml_collections.ConfigDict, data_iter=None, *,
           progress: dict | None = None, force: bool = False,
           keep_step: int | None = None) -> bool:
    """`progress`: the loop's small JSON state, committed atomically with the arrays (so it is
    always the state of exactly this step, unlike a log that may run ahead of the checkpoint).
    `keep_step`: a step never garbage-collected however old (the best eval step, which a
    specialization restores at the end); the previous save's stays kept until the next save, so
    while this one is in flight (async) the last committed checkpoint's best step is on disk."""
    self._kept.steps = {self._last_keep, keep_step}
    self._last_keep = keep_step
    items = dict(params=ocp.args.StandardSave(state.params),
                 opt_state=ocp.args.StandardSave(state.opt_state),
                 config=ocp.args.JsonSave(json.loads(config.to_json())))
    if progress is not None:
      items["progress"] = ocp.args.JsonSave(progress)
    if data_iter is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iter)
    with self._writing(step):  # also surfaces a failed earlier async save
      saved = self.manager.save(step, args=ocp.args.Composite(**items), force=force)
    if saved and self._async:
      self._in_flight = step
    return saved

  @contextlib.contextmanager
  def _writing(self, step: int | None = None):
    """A failed write (disk full, read-only or vanished filesystem) becomes a CheckpointError
    saying which checkpoint survives: orbax commits a step by renaming its temporary directory,
    so the previous complete step is still the latest."""
    try:
      yield
    except Exception as e:  # noqa: BLE001 - re-raised below unless it is a storage failure
      cause = storage_failure(e)
      if cause is None:
        raise
      # orbax's threads of the failed save end here, not racing the interpreter's exit (where
      # they fail again on a shut-down executor and log a traceback the one line hides).
      with contextlib.suppress(Exception):
        self.manager.wait_until_finished()
      # An async save's failure surfaces at the next save or wait: name the step in flight.
      failed = self._in_flight if self._in_flight is not None else step
      self._in_flight = None
      kept = self.manager.latest_step()
      raise CheckpointError(
          f"could not write checkpoint step {failed} to {self.directory}: {cause}; "
          + (f"the last complete checkpoint, step {kept}, is kept: fix the cause and rerun to "
             "resume from it" if kept is not None and kept != failed else
             "no complete checkpoint was written: fix the cause and rerun")) from e

  def saved_config(self, step: int | None = None) -> dict:
    step = self.resolve_step(step)
    restored = self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
    return dict(restored["config"])

  def saved_progress(self, step: int) -> dict | None:
    """The `progress` item of `step`; None for checkpoints written without one."""
    try:
      if "progress" not in self.manager.item_metadata(step):  # works on object stores too
        return None
      restored = self.manager.restore(
          step, args=ocp.args.Composite(progress=ocp.args.JsonRestore()))
    except Exception as e:  # orbax raises assorted types on missing or torn files
      raise self._unreadable(step, e, ": its progress item is unreadable") from e
    return dict(restored["progress"])

  def restore_params(self, abstract_params, step: int | None = None):
    step = self.resolve_step(step)
    self._check(step, "params", abstract_params)
    try:
      restored = self.manager.restore(
          step, args=ocp.args.Composite(params=ocp.args.StandardRestore(abstract_params)))
    except Exception as e:  # tensorstore/orbax raise assorted types on missing or torn files
      raise self._unreadable(step, e) from e
    return restored["params"]

  def restore(self, abstract_state, step: int | None = None, data_iter=None):
    """-> (state, step). `abstract_state` carries the target shardings; data_iter is updated."""
    step = self.resolve_step(step)
    self._check(step, "params", abstract_state.params)
    items = dict(params=ocp.args.StandardRestore(abstract_state.params),
                 opt_state=ocp.args.StandardRestore(abstract_state.opt_state))
    if data_iter is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:  # tensorstore/orbax raise assorted types on missing or torn files
      raise self._unreadable(step, e) from e
    state = abstract_state.replace(step=jax.numpy.asarray(step, jax.numpy.int32),
                                   params=restored["params"], opt_state=restored["opt_state"])
    return state, step

  def resolve_step(self, step: int | None) -> int:
    """`step`, or the latest one; CheckpointError if there is none or it is not saved."""
    if step is None:
      step = self.latest_step()
    if step is None:
      raise CheckpointError(f"no checkpoint found in {self.directory}")
    steps = sorted(self.manager.all_steps())
    if step not in steps:
      raise MissingStep(f"step {step} is not among the checkpoints in {self.directory}: "
                        f"{steps}", steps)
    return step

  def _unreadable(self, step: int, e: Exception, what: str = "") -> CorruptCheckpoint:
    others = sorted(s for s in self.manager.all_steps() if s != step)
    fix = (f"move {os.path.join(self.directory, str(step))} aside to resume from step "
           f"{others[-1]}" if others else "restart from scratch in a fresh --workdir")
    detail = f"{what.lstrip(': ')}{' ' if what else ''}({_brief(e)})"
    return CorruptCheckpoint(f"checkpoint step {step} in {self.directory} is corrupt or "
                             f"incomplete{what} ({_brief(e)}); {fix}", step, detail, others)

  def unreadable_config(self, step: int, e: Exception) -> CorruptCheckpoint:
    """The error for a step whose saved config cannot be read (saved_run.load_saved)."""
    return self._unreadable(step, e, ": its config is unreadable")

  def _check(self, step: int, item: str, expected) -> None:
    try:
      saved = self.manager.item_metadata(step)[item]
    except Exception as e:  # orbax raises assorted errors on unreadable metadata
      raise self._unreadable(step, e, ": its metadata is unreadable") from e
    if saved is None:
      raise self._unreadable(step, FileNotFoundError(f"no metadata for '{item}'"),
                             f": no readable '{item}' item")
    check_compatible(saved, expected, f"checkpoint step {step} ({item})")

  def wait(self) -> None:
    with self._writing():
      self.manager.wait_until_finished()
    self._in_flight = None

  def close(self) -> None:
    try:
      self.wait()
    finally:
      self.manager.close()


# The items a resume restores: a step without them cannot continue the run.
RESUME_ITEMS = ("params", "opt_state", "config")


def is_complete(workdir: str, step: int) -> bool:
  """Whether <workdir>/checkpoints/<step> is a checkpoint a resume can restore, by orbax's own
  records: the step directory is finalized (not a temporary one), its step metadata records a
  commit, and every item a resume restores is there. An empty or emptied step directory counts
  as finalized to orbax (on a local filesystem only its name is checked), so the metadata is
  read too. Reads files only (no CheckpointManager, nothing written)."""
  path = os.path.join(os.path.abspath(workdir), "checkpoints", str(step))
  if not os.path.isdir(path) or not os.listdir(path):
    return False
  if not ocp.step.is_checkpoint_finalized(path):
    return False
  try:
    meta = ocp.metadata.get_step_metadata(path)
  except Exception:  # noqa: BLE001 - missing or torn metadata: not a complete step
    return False
  items = meta.item_handlers if isinstance(meta.item_handlers, dict) else {}
  return bool(meta.commit_timestamp_nsecs) and all(
      name in items and os.path.isdir(os.path.join(path, name)) for name in RESUME_ITEMS)
