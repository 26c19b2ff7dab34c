"""One process per workdir: an exclusive flock on <workdir>/LOCK while a mode writes there.

Two processes writing one workdir (a double-submitted job) interleave metrics.jsonl, mix their
checkpoints and garbage-collect each other's steps. Every mode that writes a workdir (pretrain,
specialize, importance, export) and the drivers on their roots (pn_jax.experiment,
pn_jax.sweep) hold this lock; a second holder fails at once with a WorkdirError (exit 2) naming
the holder. The kernel drops an flock when its holder exits, however it exits (kill -9 included),
so a dead run leaves no stale lock: the LOCK file's content (pid, host, what, since, argv of the
last holder) is information for the error message, not the lock itself.

A run that created its workdir and fails before writing anything else there (a config or data
error raised holding the lock) removes it again: LOCK unlinked (still locked), then the empty
directory. A process that opened the old LOCK before the unlink and locks it after would hold a
lock on a file no longer in the workdir, so try_lock checks, once locked, that its descriptor is
still the file named LOCK, and tries again if not. Otherwise the file stays.

Not locked: object-store workdirs ("://" in the path: no flock there), and filesystems whose
flock does not work (some FUSE or NFS mounts: flock fails with ENOLCK/EOPNOTSUPP/ENOSYS), where
the run goes on with a warning. In multi-process runs process 0 takes the lock and every process
learns the outcome, so all of them stop with the same error.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import socket
import sys

import jax
from absl import logging

from pn_jax.parallel import distributed
from pn_jax.train.preflight import WorkdirError, check_writable

LOCK = "LOCK"
# flock errors that mean "this filesystem cannot lock", not "someone else holds it".
UNSUPPORTED = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


def holder_info(what: str) -> dict:
  """What the LOCK file records about its holder."""
  since = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
  return {"pid": os.getpid(), "host": socket.gethostname(), "what": what, "since": since,
          "argv": sys.argv}


def read_holder(lock_path: str) -> dict:
  """The LOCK file's holder info ({} if empty or unreadable: the holder may not have written
  it yet)."""
  try:
    with open(lock_path, encoding="utf-8") as f:
      info = json.load(f)
  except (OSError, ValueError):
    return {}
  return info if isinstance(info, dict) else {}


def held_message(workdir: str, info: dict, flag: str = "--workdir") -> str:
  """The one-line error for a workdir another process holds."""
  holder = (f"pid {info.get('pid', '?')} on host {info.get('host', '?')} "
            f"({info.get('what', '?')}, since {info.get('since', '?')})" if info else
            "a process that has not written its details yet")
  return (f"{flag} {workdir} is in use by {holder}: wait for it to finish or stop it; if that "
          f"process is gone and this message persists, the filesystem keeps a lock for a dead "
          f"process (see docs/operations.md, 'The workdir lock')")


def try_lock(workdir: str, what: str, flag: str = "--workdir", *,
             retry: bool = True) -> int | None:
  """Locks `workdir` (creating it); -> the LOCK file's descriptor, or None when the filesystem
  cannot lock (a warning says so). WorkdirError if another process holds it. `retry`: once more
  if the LOCK file (or the workdir) was removed under us (see the module docstring)."""
  path = check_writable(workdir, flag)
  lock_path = os.path.join(path, LOCK)
  try:
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
  except OSError as e:
    if e.errno == errno.ENOENT and retry:  # the workdir was removed after check_writable
      return try_lock(workdir, what, flag, retry=False)
    raise WorkdirError(f"{flag} {path}: cannot open {lock_path} ({e.strerror or e}); "
                       "choose a writable directory") from e
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except OSError as e:
    os.close(fd)
    if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
      raise WorkdirError(held_message(path, read_holder(lock_path), flag)) from None
    if e.errno in UNSUPPORTED:
      logging.warning("%s %s: this filesystem does not support flock (%s): running "
                      "WITHOUT the workdir lock; make sure no other process uses this directory",
                      flag, path, os.strerror(e.errno))
      return None
    raise
  if not _is_lock_file(fd, lock_path):  # unlinked between our open and flock: lock the new one
    os.close(fd)
    if retry:
      return try_lock(workdir, what, flag, retry=False)
    raise WorkdirError(f"{flag} {path}: its LOCK file was removed twice while this run locked "
                       "it; make sure no other process uses this directory")
  try:
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(holder_info(what)) + "\n").encode(), 0)
  except OSError as e:  # e.g. a full disk: do not keep a lock the caller will never release
    os.close(fd)
    raise WorkdirError(f"{flag} {path}: cannot write {lock_path} ({e.strerror or e}); free some "
                       "space or choose another directory") from e
  return fd


def _is_lock_file(fd: int, lock_path: str) -> bool:
  """Whether the locked descriptor is still the file at lock_path (not one unlinked since)."""
  try:
    return os.path.samestat(os.fstat(fd), os.stat(lock_path))
  except FileNotFoundError:
    return False


def _remove_if_only_lock(workdir: str) -> None:
  """Removes a workdir that holds nothing but its LOCK (called holding the lock, by the run
  that created the workdir, when that run fails): a refused run leaves no directory behind."""
  path = os.path.abspath(workdir)
  try:
    if os.listdir(path) != [LOCK]:
      return
    os.unlink(os.path.join(path, LOCK))
    os.rmdir(path)  # fails, harmlessly, if another process put a file there meanwhile
  except OSError as e:
    logging.warning("could not remove the workdir %s this run created (%s)", path, e)


@contextlib.contextmanager
def hold(workdir: str, what: str, flag: str = "--workdir"):
  """Holds the workdir lock for the `with` block (released on every exit, exceptions included);
  `flag` names the directory in messages (--workdir, --root). A workdir this call created is
  removed again if the block fails leaving nothing in it but LOCK.

  Multi-process: process 0 locks and the outcome is shared (a collective: every process must
  enter), so every process raises the WorkdirError and exits 2, not only process 0.
  """
  if "://" in workdir:  # object stores: no flock; one writer per workdir is up to the user
    logging.info("%s %s is an object store: not locked", flag, workdir)
    yield
    return
  fd, error, created = None, None, False
  # (is_multiprocess first: a single-process driver, e.g. the sweep, must not start a backend)
  if not distributed.is_multiprocess() or jax.process_index() == 0:
    created = not os.path.exists(workdir)
    try:
      fd = try_lock(workdir, what, flag)
    except WorkdirError as e:
      error = e
  if distributed.max_over_processes(int(error is not None)):
    raise error or WorkdirError(f"{flag} {os.path.abspath(workdir)}: process 0 could not "
                                "lock it (its error says why)")
  try:
    yield
  except BaseException:
    if fd is not None and created:
      _remove_if_only_lock(workdir)
    raise
  finally:
    if fd is not None:
      os.close(fd)  # releases the flock; the file stays (see the module docstring)
