"""The paper-scale PN grid (Sec. 2.5 sizes): k clusters x h basis slices x m code length.

Every point is a full pretraining run (configs/pn.py): launch it on a cluster, e.g.
  python -m pn_jax.sweep --sweep=configs/sweeps/hkm_paper.py --root=runs/hkm --mode=slurm \
      --sbatch=--nodes=1 --sbatch=--gres=gpu:8 --sbatch=--time=24:00:00
Points with m > h are left out (validate() refuses them).
"""

from pn_jax.config_args import INT, Accepts
from pn_jax.sweep import product


ARGS = Accepts(keys=dict(steps=INT))


def get_sweep(arg=None):
  args = ARGS.parse(arg, __file__)
  steps = args.get("steps", 100_000)
  points = [p for p in product(**{"model.k": [16, 32], "model.h": [8, 16, 24],
                                  "model.m": [4, 8, 16]})
            if p["model.m"] <= p["model.h"]]
  return dict(config="configs/pn.py", base={"train.steps": steps}, points=points,
              plot={"x": "model.h", "y": "eval_loss"})
