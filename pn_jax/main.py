"""Entry point: python -m pn_jax.main --config=configs/pn.py:tiny --workdir=runs/x --mode=pretrain"""

from __future__ import annotations

import json
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from pn_jax import modes

_CONFIG = config_flags.DEFINE_config_file("config", None, "Run config (configs/<kind>.py[:arg]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics, tokenizer.")
_MODE = flags.DEFINE_enum("mode", "pretrain", sorted(modes.MODES), "What to do.")


def main(argv):
  del argv
  if _CONFIG.value is None or _WORKDIR.value is None:
    raise app.UsageError("--config and --workdir are required")
  logging.info("mode=%s workdir=%s", _MODE.value, _WORKDIR.value)
  try:
    result = modes.MODES[_MODE.value](_CONFIG.value, _WORKDIR.value)
  except modes.USER_ERRORS as e:
    logging.error("%s: %s", type(e).__name__, e)
    print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
    sys.exit(2)
  print(json.dumps({"mode": _MODE.value, **(result or {})}, default=float))


def run():
  app.run(main)


if __name__ == "__main__":
  run()
