"""The log policy of every absl command line (pn_jax.main, .experiment, .sweep, .bench, .aot),
installed by cli.parse_flags right after the flags are parsed.

Orbax writes ~70 INFO lines per checkpoint and JAX a few at start-up, all through the same absl
handler as pn-jax's own lines; they buried the step lines and the result. By default
(`--log_level=concise`) a record is shown when it is a warning or worse, from anyone, or when
pn-jax's own code logged it (decided by the calling file: orbax and pn-jax both log through
absl's one logger). `--log_level=info` shows everything at INFO (the old behaviour), `debug`
everything, `warning` warnings only; an explicit `-v`/`--verbosity` without `--log_level` leaves
the levels to absl, unfiltered. `concise` and `warning` also hide the NOTICES: warnings by which
a library only confirms a setting pn-jax chose (orbax, on every read-only checkpoint directory
a specialize or eval opens).

A checkpoint save that the filesystem refuses (a full disk) is reported in one line by
pn_jax.train.checkpoint; at `concise` and `warning` the tracebacks that orbax's background threads
log for it, and the "Event loop is closed" errors that tensorstore's late callbacks raise after
it, are not shown (StorageNoiseFilter, `_quiet_unraisable`).

Every level also writes log lines with tqdm's bars cleared first and redrawn after, so a line
never lands at the end of the progress bar's line.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
import threading

from absl import flags
from absl import logging as absl_logging
from tqdm import tqdm

from pn_jax import storage

LEVELS = {"concise": logging.INFO, "info": logging.INFO, "debug": logging.DEBUG,
          "warning": logging.WARNING}
# Python loggers of libraries, set to WARNING when quiet (unless the user has set them).
LIBRARY_LOGGERS = ("jax", "jaxlib", "orbax", "etils", "tensorstore", "grain", "tensorboardX")

_LOG_LEVEL = flags.DEFINE_enum(
    "log_level", "concise", list(LEVELS),
    "concise: pn-jax's INFO lines and anyone's warnings (libraries' INFO lines hidden); info: "
    "every INFO line (orbax, JAX, absl included); debug: everything; warning: warnings and "
    "errors only. An explicit -v/--verbosity without --log_level leaves levels to absl.")

# (a word of the logging file's path, the message's start): warnings that report no problem.
NOTICES = (("orbax", "Given directory is read only"),)

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


@functools.lru_cache(maxsize=4096)
def _in_package(pathname: str) -> bool:
  return os.path.abspath(pathname).startswith(_PACKAGE_DIR)


def is_own(record: logging.LogRecord) -> bool:
  """Whether pn-jax's code logged `record`: by its file (absl's logger, shared with orbax, names
  the real caller) or by a `pn_jax.*` logger name."""
  return (record.name == "pn_jax" or record.name.startswith("pn_jax.")
          or _in_package(record.pathname or ""))


def is_notice(record: logging.LogRecord) -> bool:
  """Whether `record` is one of the NOTICES (a warning that reports no problem)."""
  path = record.pathname or ""
  return any(word in path and record.getMessage().startswith(start) for word, start in NOTICES)


class ConciseFilter(logging.Filter):
  """Passes warnings and worse from anyone (but the NOTICES), INFO and below from pn-jax's own
  code only."""

  def filter(self, record: logging.LogRecord) -> bool:
    if record.levelno >= logging.WARNING:
      return not is_notice(record)
    return is_own(record)


class StorageNoiseFilter(logging.Filter):
  """Drops a library's error record whose exception is the filesystem refusing a write: orbax
  logs each failed write of a checkpoint save with its traceback (6-27 per save), and
  pn_jax.train.checkpoint reports the failure in one line naming the surviving step."""

  def __init__(self):
    super().__init__()
    self.refused = False  # a write was refused: the save it belonged to has failed

  def filter(self, record: logging.LogRecord) -> bool:
    if record.levelno < logging.ERROR or is_own(record) or not record.exc_info:
      return True
    if storage.error_code(record.exc_info[1]) is not None:
      self.refused = True
      return False
    return not (self.refused and _late_at_exit(record.exc_info[1]))


def _late_at_exit(e: BaseException) -> bool:
  """A library thread that outlived the main thread and found the executors shut down: after a
  refused write, what is left of the failed save's threads (pn_jax.train.checkpoint waits for
  them before it reports the failure; this is the remainder of that race)."""
  return (isinstance(e, RuntimeError) and "cannot schedule new futures after shutdown" in str(e)
          and not threading.main_thread().is_alive())


def _quiet_unraisable(previous):
  """A sys.unraisablehook that drops asyncio's "Event loop is closed" raised in a callback that
  tensorstore runs after orbax's event loop has ended (after a failed write); others go on to
  `previous`."""
  def hook(unraisable):
    e = unraisable.exc_value
    if isinstance(e, RuntimeError) and str(e) == "Event loop is closed":
      return
    previous(unraisable)
  hook.pn_jax_quiet = True
  return hook


class BarSafeHandler(logging.Handler):
  """Emits through `inner` (absl's handler) inside tqdm.external_write_mode: the bar is cleared,
  the line written, the bar redrawn."""

  def __init__(self, inner: logging.Handler):
    super().__init__()
    self.inner = inner

  def handle(self, record: logging.LogRecord) -> bool:
    if not self.filter(record):
      return False
    with tqdm.external_write_mode(file=sys.stderr):
      return bool(self.inner.handle(record))

  def emit(self, record: logging.LogRecord) -> None:  # (handle() bypasses it; for completeness)
    self.inner.emit(record)

  def flush(self) -> None:
    self.inner.flush()


def chosen_level(flag_values=flags.FLAGS) -> str | None:
  """The --log_level to apply; None when an explicit -v/--verbosity (and no --log_level) hands
  the levels to absl."""
  if not flag_values["log_level"].present and flag_values["verbosity"].present:
    return None
  return flag_values["log_level"].value


def install(flag_values=flags.FLAGS) -> str | None:
  """Applies the policy of the parsed flags to the root logger (idempotent); -> the level name
  applied (None: absl's own -v)."""
  level = chosen_level(flag_values)
  if level is not None:
    # Named, as absl's levels are not Python's. Setting it also stops app.run's bump of an
    # unset verbosity to INFO, which would undo "warning" and "debug".
    absl_logging.set_verbosity("info" if level == "concise" else level)
    logging.getLogger().setLevel(LEVELS[level])  # (set_verbosity does it only the first time)
  handler = _bar_safe_root_handler()
  for f in [f for f in handler.filters if isinstance(f, (ConciseFilter, StorageNoiseFilter))]:
    handler.removeFilter(f)
  if level in ("concise", "warning"):
    for name in LIBRARY_LOGGERS:
      if logging.getLogger(name).level == logging.NOTSET:  # not set by the user or the library
        logging.getLogger(name).setLevel(logging.WARNING)
  if level in ("concise", "warning"):  # (at "warning" only the NOTICES are left to hide)
    handler.addFilter(ConciseFilter())
    handler.addFilter(StorageNoiseFilter())
    if not getattr(sys.unraisablehook, "pn_jax_quiet", False):
      sys.unraisablehook = _quiet_unraisable(sys.unraisablehook)
  return level


def _bar_safe_root_handler() -> BarSafeHandler:
  """The root logger's BarSafeHandler, put in place of absl's handler on the first call."""
  root = logging.getLogger()
  for h in root.handlers:
    if isinstance(h, BarSafeHandler):
      return h
  absl_handler = absl_logging.get_absl_handler()
  wrapper = BarSafeHandler(absl_handler)
  root.removeHandler(absl_handler)  # (a no-op where app.run has not installed it)
  root.addHandler(wrapper)
  return wrapper
