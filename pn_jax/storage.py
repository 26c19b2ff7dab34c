"""Writes the filesystem refuses for lack of room, outside checkpoint saves (data preparation,
exports, run records): ENOSPC (disk full), EDQUOT (quota) and EFBIG (over the file-size limit,
`ulimit -f`) become one `OutOfSpace` error naming the file, the space it needed and what is free,
with the writer's temporary file removed, so what was complete before is what remains.

Imports neither jax nor orbax: `python -m pn_jax.data` and the CLI's error path use it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import resource
import shutil

SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)

# How libraries that are not Python report an OS error in a message: tensorstore
# ("[os_error_code='28']") and Rust's std::io, e.g. safetensors ("(os error 28)").
_OS_ERROR_CODE = re.compile(r"os_error_code='?(\d+)|\(os error (\d+)\)")


class OutOfSpace(RuntimeError):
  """A write refused for lack of space or over the file-size limit; the message names the file,
  the space it needed and the space free."""


def error_code(e: BaseException | None) -> int | None:
  """The OS error code behind `e` (an OSError, or one a library names in its message: by code,
  or for the space errors by their text, as ArrayRecord's writer does), looked for along the
  exception chain; None if there is none."""
  while e is not None:
    if isinstance(e, OSError) and e.errno:
      return e.errno
    text = str(e)
    match = _OS_ERROR_CODE.search(text)
    if match:
      return int(match.group(1) or match.group(2))
    if not isinstance(e, OutOfSpace) and (code := space_error_in(text)):
      return code
    e = e.__cause__ or e.__context__
  return None


def space_error_in(text: str) -> int | None:
  """The space errno whose message (`No space left on device`, ...) `text` holds: how another
  program's stderr, or ArrayRecord's writer, reports one; None if none."""
  return next((code for code in SPACE_ERRNOS if os.strerror(code) in text), None)


def is_out_of_space(e: BaseException) -> bool:
  return error_code(e) in SPACE_ERRNOS


def size(n: float) -> str:
  for unit in ("B", "KiB", "MiB", "GiB"):
    if abs(n) < 1024 or unit == "GiB":
      return f"{n:.0f} B" if unit == "B" else f"{n:.1f} {unit}"
    n /= 1024
  return ""


def free_bytes(path: str) -> int | None:
  """Free space on the filesystem of `path` (its nearest existing parent); None if unknown."""
  path = os.path.abspath(path)
  while not os.path.exists(path) and os.path.dirname(path) != path:
    path = os.path.dirname(path)
  try:
    return shutil.disk_usage(path).free
  except OSError:
    return None


def message(path: str, code: int, needed: int | None = None, *, cleaned: bool = True) -> str:
  """The OutOfSpace message for a failed write of `path` (`cleaned`: its temporary file was
  removed, as pn-jax's writers do; not so for another program's)."""
  needs = f"it needs {size(needed)}" if needed else "it could not be written in full"
  if code == errno.EFBIG:
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    where = ("over this process's file-size limit of "
             f"{size(limit)} (ulimit -f)" if limit != resource.RLIM_INFINITY else
             "over the filesystem's largest file size")
    fix = "raise the limit or write elsewhere"
  else:
    free = free_bytes(path)
    where = f"its filesystem has {size(free)} free" if free is not None else "no space is free"
    fix = "free some space or use a larger disk"
  return (f"could not write {path}: {os.strerror(code)} (errno {code}); {needs}, {where}; {fix}, "
          "then rerun" + (" (the incomplete file was removed; files written before are kept)"
                          if cleaned else ""))


def remove(path: str) -> None:
  """Removes a file or a directory tree (a temporary one), if it is there."""
  if os.path.isdir(path) and not os.path.islink(path):
    shutil.rmtree(path, ignore_errors=True)
  elif os.path.lexists(path):
    os.remove(path)


@contextlib.contextmanager
def writing(path: str, *, needed: int | None = None, temp: str | None = None):
  """The block that writes `path` (through the file or directory `temp`, removed if the block
  fails in any way): a refusal for lack of space (or the file-size limit) becomes OutOfSpace."""
  try:
    yield
  except BaseException as e:
    if temp:
      remove(temp)
    if isinstance(e, OutOfSpace):  # an inner write's, naming its own file
      raise
    code = error_code(e) if isinstance(e, Exception) else None
    if code not in SPACE_ERRNOS:
      raise
    raise OutOfSpace(message(path, code, needed)) from e


def describe(e: BaseException) -> str:
  """The OutOfSpace message of a space error that no writer wrapped (its file if it names one)."""
  cause = e
  while cause is not None and not (isinstance(cause, OSError) and cause.filename):
    cause = cause.__cause__ or cause.__context__
  path = cause.filename if cause is not None else "a file"
  return message(str(path), error_code(e), cleaned=False)
