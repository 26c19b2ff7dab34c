"""The one error path of every command-line entry point (pn_jax.main, .experiment, .sweep, .bench,
.data): bad input exits 2 with ONE line on stderr, `error: <Kind>: <what is wrong and the fix>`,
and no traceback; anything else is a bug and keeps its traceback (exit 1).

Each entry point runs its main through `entry(...)` (absl ones parse flags with `parse_flags`,
which also installs the log policy of log_setup.py; argparse ones use `ArgumentParser`), so a
user error is reported the same way wherever it is raised: in flag parsing, in a config file, or
deep inside a mode.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys


class UsageError(ValueError):
  """A bad command line: a missing or unknown flag, a sub-command's wrong argument."""


def user_error_types() -> tuple[type[BaseException], ...]:
  """The exceptions that mean "the input is wrong" (exit 2). Imported when asked, i.e. on the
  error path only: pn_jax.modes pulls in jax, which `python -m pn_jax.data` does not need."""
  from absl import app

  from pn_jax import modes
  from pn_jax.config import ConfigError
  from pn_jax.data import DataError
  from pn_jax.storage import OutOfSpace
  return (UsageError, app.UsageError, ConfigError, DataError, OutOfSpace, *modes.USER_ERRORS)


def is_user_error(e: BaseException) -> bool:
  """A user error, or a write the filesystem refused for lack of space that no writer turned
  into OutOfSpace (a full disk is the user's to fix, never a traceback)."""
  from pn_jax import storage
  return isinstance(e, user_error_types()) or storage.is_out_of_space(e)


def one_line(message) -> str:
  return " ".join(str(message).split())


def print_error(line: str) -> None:
  """One write, on a line of its own: after a failed orbax read, tensorstore's threads can still
  be printing tracebacks to stderr, and a print() split in pieces would interleave with them."""
  sys.stdout.flush()
  sys.stderr.flush()
  os.write(sys.stderr.fileno(), f"\n{line}\n".encode())


def fail(kind: str, message, exit_now=sys.exit) -> None:
  """Reports a user error in one line and exits 2 (`exit_now`: distributed.exit_now with peers)."""
  print_error(f"error: {kind}: {one_line(message)}")
  exit_now(2)


def entry(main, exit_now=None):
  """`main` with user errors reported by `fail` (exit 2); crashes propagate with their traceback.
  `exit_now` is looked up at exit time (tests may replace sys.exit)."""

  @functools.wraps(main)
  def run(*args, **kwargs):
    try:
      return main(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 -- re-raised unless it is a user error
      if not is_user_error(e):
        raise
      if isinstance(e, user_error_types()):
        fail(type(e).__name__, e, exit_now or sys.exit)
      from pn_jax import storage
      fail(storage.OutOfSpace.__name__, storage.describe(e), exit_now or sys.exit)
  return run


# --- absl entry points ------------------------------------------------------------------------


def parse_flags(argv):
  """absl's flag parsing with every problem as a one-line error (exit 2): wrong flag values,
  unknown flags or --config.* keys, a config file that is missing, does not compile, or refuses
  its argument (pn_jax/config_args.py). Then the log policy of --log_level (log_setup.py), and
  no TPU probing where no TPU is attached (parallel/platforms.py)."""
  from absl import flags

  from pn_jax import log_setup  # defines --log_level
  from pn_jax.config import ConfigError, syntax_error
  from pn_jax.parallel import platforms
  try:
    rest = flags.FLAGS(argv)
  except SyntaxError as e:  # a config file that does not compile (config_flags lets it escape)
    fail("ConfigError", syntax_error(e))
  except flags.Error as e:  # wrong types, unknown flags; config_flags re-wraps get_config errors
    cause = _innermost(e, ConfigError)
    if cause is not None:
      fail("ConfigError", cause)
    fail("UsageError", e)
  except (AttributeError, KeyError) as e:  # ml_collections: override of a key the config lacks
    if not any(a.startswith("--") and "." in a.split("=")[0] for a in argv[1:]):
      raise
    fail("ConfigError", unknown_key_message(flags.FLAGS, argv[1:]) or
         f"unknown config key {_innermost_message(e)}")
  _check_config_files(flags.FLAGS)
  log_setup.install(flags.FLAGS)
  platforms.skip_absent_tpu()
  return rest


def _innermost_message(e: BaseException) -> str:
  while isinstance(e, BaseException) and e.args:  # AttributeError(KeyError(message))
    e = e.args[0]
  return str(e).replace("\n", "; ")


def unknown_key_message(flag_values, args) -> str | None:
  """'unknown config key train.chekpoint_every (in --config.train.chekpoint_every=3); closest
  known keys: train.checkpoint_every, ...' for the first `--<config flag>.<key>` override naming
  a key its loaded config lacks; None if none does. Only that flag and the closest keys
  (difflib), not every override of the command line."""
  import difflib
  keys_of = {}  # config flag -> its config's keys (None: not a config file flag)
  for arg in args:
    name, _, _ = arg.lstrip("-").partition("=")
    flag, _, key = name.partition(".")
    if not key or flag not in flag_values:
      continue
    if flag not in keys_of:
      config = _loaded_config(flag, args)
      keys_of[flag] = None if config is None else _dotted_keys(config)
    known = keys_of[flag]
    if known is None or key in known:
      continue
    leaves = [k for k in known if not any(other.startswith(k + ".") for other in known)]
    close = difflib.get_close_matches(key, leaves, n=3, cutoff=0.6)
    if not close:  # nothing alike: the closest keys of the section the override names
      section = key.rpartition(".")[0]
      pool = ([k for k in leaves if k.startswith(section + ".")] if section in known else
              [k for k in known if "." not in k])
      close = difflib.get_close_matches(key, pool, n=3, cutoff=0.0)
    hint = f"; closest known keys: {', '.join(close)}" if close else ""
    return f"unknown config key {key!r} (in {arg}){hint}"
  return None


def _loaded_config(name: str, args):
  """The ConfigDict of config_flags flag `name`, loaded again from the file its `--name=` arg
  gives (a failed override leaves the flag without a value); None for other flags."""
  import ml_collections

  from pn_jax.config import load_config
  specs = [a.split("=", 1)[1] for a in args if a.startswith(f"--{name}=")]
  if not specs or ".py" not in specs[-1]:  # not a config file flag
    return None
  try:
    config = load_config(specs[-1])
  except Exception:  # noqa: BLE001 - no suggestion then; the flag's own error stands
    return None
  return config if isinstance(config, ml_collections.ConfigDict) else None


def _dotted_keys(config, prefix: str = "") -> list[str]:
  """Every key of a ConfigDict, sections and leaves, as dotted paths."""
  out = []
  for k, v in config.items():
    out.append(prefix + k)
    if hasattr(v, "items") and not isinstance(v, str):
      out.extend(_dotted_keys(v, prefix + k + "."))
  return out


def _innermost(e: BaseException, kind: type) -> BaseException | None:
  """The deepest exception of type `kind` in e's context chain: config_flags re-raises a
  get_config error as `kind('Error whilst parsing config file: <traceback>')`, absl re-raises
  that as IllegalFlagValueError; the original holds the message meant for the user."""
  found, seen = None, set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if isinstance(e, kind):
      found = e
    e = e.__cause__ or e.__context__
  return found


def _check_config_files(flag_values) -> None:
  """config_flags defers a missing config file's error to the first use of the config: report it
  now, before anything runs."""
  for name in flag_values:
    flag = flag_values[name]
    if type(flag.value).__name__ == "_ErrorConfig":
      path = flag.config_filename.partition(":")[0]
      where = "" if os.path.isabs(path) else f" (in {os.getcwd()})"
      fail("ConfigError", f"--{name}: config file {path!r} does not exist{where}; check the path")


# --- argparse entry points --------------------------------------------------------------------


class ArgumentParser(argparse.ArgumentParser):
  """argparse whose errors are UsageErrors (one line through `entry`) instead of a usage block
  and argparse's own exit 2; sub-parsers inherit the class."""

  def error(self, message):
    raise UsageError(f"{self.prog}: {message} (see {self.prog} --help)")
