"""Tiny PN sweep over the basis size h and code length m (k fixed by the tiny config).

  python -m pn_jax.sweep --sweep=configs/sweeps/hkm_tiny.py --root=runs/sweep_hkm_tiny
  python -m pn_jax.sweep --sweep=configs/sweeps/hkm_tiny.py:steps=3 ...   # a smoke test

Arg keys: steps (train.steps per point), k (adds a k axis: k=4/8 -> both), corpus (a prepared
corpus directory instead of the bundled tiny one).
"""

from pn_jax.config_args import INT, TEXT, Accepts, int_list
from pn_jax.sweep import product


ARGS = Accepts(keys=dict(steps=INT, k=int_list("/"), corpus=TEXT))


def get_sweep(arg=None):
  args = ARGS.parse(arg, __file__)
  steps = args.get("steps", 200)
  axes = {"model.h": [4, 8], "model.m": [2, 4]}
  if "k" in args:
    axes = {"model.k": args["k"], **axes}
  base = {"train.steps": steps, "train.eval_every": steps, "train.checkpoint_every": steps,
          "train.log_every": max(1, min(25, steps))}
  if "corpus" in args:
    base["data.corpus"] = args["corpus"]
  return dict(
      config="configs/pn.py:tiny",
      base=base,
      points=product(**axes),
      plot={"x": "model.h", "y": "eval_loss"},
  )
