"""Entry point: python -m pn_jax.main --config=configs/pn.py:tiny --workdir=runs/x --mode=pretrain"""

from __future__ import annotations

import signal
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from pn_jax import cli, modes
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
    raise cli.UsageError("--config and --workdir are required, e.g. "
                         "--config=configs/pn.py:tiny --workdir=runs/x")
  xla_flags.apply()  # GPU-only XLA flags, before jax initialises a backend (CPU: untouched)
  distributed.initialize()  # before anything touches a device; no-op for one process
  logging.info("%s; mode=%s workdir=%s", distributed.describe(), _MODE.value, _WORKDIR.value)
  try:
    extra = ({"allow_config_change": _ALLOW_CONFIG_CHANGE.value}
             if _MODE.value in modes.TRAINING_MODES else {})
    result = modes.MODES[_MODE.value](_CONFIG.value, _WORKDIR.value, **extra)
  except Exception as e:  # a crash: with peers, leave at once so they fail fast instead of hanging
    if cli.is_user_error(e) or not distributed.is_multiprocess():
      raise  # a user error: one line and exit 2 (cli.entry), once
    logging.exception("process failed")
    distributed.exit_now(1)
  distributed.shutdown()  # on success only: a failed process must not wait at the barrier
  print(modes.result_line(_MODE.value, result))
  reason = (result or {}).get("stop_reason", "")
  if reason.startswith("SIG"):  # preempted: checkpoint saved, but the job is not done
    sys.exit(128 + signal.Signals[reason].value)


def run():
  app.run(cli.entry(main, exit_now=distributed.exit_now), flags_parser=cli.parse_flags)


if __name__ == "__main__":
  run()
