"""Times the pretraining step of every method of one or more experiment configs, alone on this
machine's device, for `pretrain_scale=time:<method>` (pn_jax/step_costs.py):

  python launch/step_costs.py configs/experiments/gpu_small.py \
      configs/experiments/gpu_small.py:recipe --out=/tmp/pn_exp/step_costs.json

Run it before the experiments that read it, with nothing else on the device (launch/
gpu_experiment.sh does). Steps already in --out (by what their cost depends on) are not timed
again, so the parts of one comparison share one measurement per architecture. Prints the file.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("configs", nargs="+", help="experiment configs (file[:part])")
  p.add_argument("--out", required=True, help="the step costs JSON (read, then updated)")
  p.add_argument("--steps", type=int, default=30, help="timed steps per configuration")
  args = p.parse_args(argv)
  from pn_jax import config as config_lib
  from pn_jax import experiment, step_costs
  configs = {}
  try:
    for spec in args.configs:
      exp = config_lib.load_config(spec)
      for name, c in experiment.step_cost_configs(exp).items():
        configs.setdefault(step_costs.cost_key(c), (f"{spec}/{name}", c))
    costs = step_costs.measure(dict(configs.values()), args.out, steps=args.steps)
  except config_lib.ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(json.dumps(costs, indent=1))
  return 0


if __name__ == "__main__":
  sys.exit(main())
