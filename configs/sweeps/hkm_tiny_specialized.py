"""Tiny PN sweep over k and h scored by the specialized model, on the bundled corpus (CPU).

  python -m pn_jax.sweep --sweep=configs/sweeps/hkm_tiny_specialized.py --root=runs/sweep_spec

Each point (k in 2/4 x h in 4/8, m=2) is a method of the tiny comparison experiment
(configs/experiments/cpu_small.py:tiny: its corpus subset, 16 pretraining steps of 512 tokens,
fine-tuning on legal at 4,096 tokens), pretrained, specialized and evaluated, next to the SLM on
the same tokens and the SLM fitted to the dearest point's device time (the largest k and h: its
step and the SLM's timed alone by --prepare). About 2 minutes on 2 cores; a check of the
machinery, not a result. Writes <root>/results.{csv,md,png}.

Arg keys: k, h (the grid's values, e.g. k=2 or h=4/8), source (a prepared corpus root instead
of the bundled one, e.g. data_cache), time (0: no SLM fitted to a point's time, no step timing).
"""

from pn_jax.config_args import FLAG, TEXT, Accepts, int_list
from pn_jax.sweep import product

ARGS = Accepts(keys=dict(k=int_list("/"), h=int_list("/"), source=TEXT, time=FLAG))


def get_sweep(arg=None):
  args = ARGS.parse(arg, __file__)
  ks, hs = args.get("k", [2, 4]), args.get("h", [4, 8])
  specialize = dict(experiment="configs/experiments/cpu_small.py:tiny",
                    source=args.get("source", "tiny"))
  if args.get("time", True):
    specialize["time_of"] = f"k={max(ks)},h={max(hs)}"
  return dict(
      config="configs/pn.py:tiny",
      base={"model.m": 2},
      points=product(**{"model.k": ks, "model.h": hs}),
      specialize=specialize,
      plot={"x": "pretrain_seconds"},
  )
