"""Entry point: python -m pn_jax.main --config=configs/pn.py:tiny --workdir=runs/x --mode=pretrain"""

from __future__ import annotations

import json
import os
import signal
import sys

import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from pn_jax import modes
from pn_jax.parallel import distributed, xla_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Run config (configs/<kind>.py[:arg]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics, tokenizer.")
_MODE = flags.DEFINE_enum("mode", "pretrain", sorted(modes.MODES), "What to do.")
_ALLOW_CONFIG_CHANGE = flags.DEFINE_bool(
    "allow_config_change", False, "Resume from a checkpoint whose saved config differs from "
    "--config in keys other than run control (pretrain/specialize/importance; shape-changing "
    "keys are always refused). See docs/operations.md 'What a resume compares'.")


def main(argv):
  del argv
  if _CONFIG.value is None or _WORKDIR.value is None:
    raise app.UsageError("--config and --workdir are required")
  if not isinstance(_CONFIG.value, ml_collections.ConfigDict):  # config_flags defers load errors
    _user_error("ConfigError", getattr(_CONFIG.value, "_error", _CONFIG.value))
  xla_flags.apply()  # GPU-only XLA flags, before jax initialises a backend (CPU: untouched)
  distributed.initialize()  # before anything touches a device; no-op for one process
  logging.info("%s; mode=%s workdir=%s", distributed.describe(), _MODE.value, _WORKDIR.value)
  try:
    extra = ({"allow_config_change": _ALLOW_CONFIG_CHANGE.value}
             if _MODE.value in modes.TRAINING_MODES else {})
    result = modes.MODES[_MODE.value](_CONFIG.value, _WORKDIR.value, **extra)
  except modes.USER_ERRORS as e:
    logging.error("%s: %s", type(e).__name__, e)
    _print_error(f"error: {type(e).__name__}: {e}")
    distributed.exit_now(2)
  except Exception:  # a crash: with peers, leave at once so they fail fast instead of hanging
    if not distributed.is_multiprocess():
      raise
    logging.exception("process failed")
    distributed.exit_now(1)
  distributed.shutdown()  # on success only: a failed process must not wait at the barrier
  print(json.dumps({"mode": _MODE.value, **(result or {})}, default=float))
  reason = (result or {}).get("stop_reason", "")
  if reason.startswith("SIG"):  # preempted: checkpoint saved, but the job is not done
    sys.exit(128 + signal.Signals[reason].value)


def _user_error(kind: str, message) -> None:
  _print_error(f"error: {kind}: {' '.join(str(message).split())}")
  sys.exit(2)


def _print_error(line: str) -> None:
  """One write, on a line of its own: after a failed orbax read, tensorstore's threads can still
  be printing tracebacks to stderr, and a print() split in pieces would interleave with them."""
  sys.stdout.flush()
  sys.stderr.flush()
  os.write(sys.stderr.fileno(), f"\n{line}\n".encode())


def parse_flags(argv):
  """absl's flag parsing, with bad flags and unknown --config.* keys as one-line errors (exit 2)."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:  # wrong types, unknown flags, unreadable config file
    _user_error("UsageError", e)
  except (AttributeError, KeyError) as e:  # ml_collections: override of a key the config lacks
    overrides = [a.split("=")[0] for a in argv[1:] if a.startswith("--config.")]
    if not overrides:
      raise
    while isinstance(e, BaseException) and e.args:  # AttributeError(KeyError(message))
      e = e.args[0]
    detail = str(e).replace("\n", "; ")
    _user_error("ConfigError", f"unknown config key {detail} (in {' '.join(overrides)})")


def run():
  app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
  run()
