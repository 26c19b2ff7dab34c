"""PN k x h sweep scored by the specialized model on the gpu_small miniature, sized for one device
session (~25 minutes on one H100): which PN gives the best specialized small model for its
pretraining cost?

  python -m pn_jax.sweep --sweep=configs/sweeps/hkm_gpu_small.py --root=runs/sweep_gpu --mode=local

Points: k in 16/32 x h in 12/24/48 (m = min(16, h)), otherwise the miniature's adopted PN
(configs/experiments/gpu_small.py's PN_ADOPTED: d_model 128, 4 layers, MLP 512, shared codes, its
adopted lr), each pretrained on the miniature's 120M generic tokens and fine-tuned on its four
domains at 1M tokens; beside them its tuned SLM (SLM_TUNED) on the same tokens and that SLM
fitted to the device time of k=32,h=48,m=16 (the dearest step; both steps timed alone by
--prepare, launch/step_costs.py's measurement).

Estimate from docs/results.md (gpu_small on one H100): preparation ~4-5 min (the tokenizer on
the 137 MB generic set, k-means for k=16 and 32, the step timing); per part ~16 s of training
plus ~20 s of compile, evals and checkpoints, 4 fine-tuning cells of 10-20 s and ~10 s of start-up:
~1.8 min x 8 parts, ~15 min; about 20 minutes in all.

On the lent device machine (at most 10 minutes a command; docs/launch.md): carry the corpus and
the wheels as for the experiment (`python launch/gpu_experiment.py pack` here; there install the
wheels and `python3 launch/gpu_experiment.py unpack --to=/tmp/pn_corpus`), then call, back to
back, until it exits 0 (143: stopped at a resumable point, the running stage checkpointed):
  timeout -s TERM 540 python3 -m pn_jax.sweep \\
      --sweep=configs/sweeps/hkm_gpu_small.py:source=/tmp/pn_corpus --root=/tmp/pn_sweep

Arg keys: source (the prepared corpus root, default data_cache), time (0: no SLM fitted to a
point's time).
"""

import pathlib

from pn_jax.config import load_module
from pn_jax.config_args import FLAG, TEXT, Accepts
from pn_jax.sweep import product

ARGS = Accepts(keys=dict(source=TEXT, time=FLAG))
GPU_SMALL = pathlib.Path(__file__).parents[1] / "experiments" / "gpu_small.py"


def get_sweep(arg=None):
  args = ARGS.parse(arg, __file__)
  gpu = load_module(str(GPU_SMALL))
  # The adopted PN's overrides (its shape and lr) but the swept k, h, m.
  adopted = dict(item.split("=") for item in gpu.PN_ADOPTED.split(","))
  base = {k: v for k, v in adopted.items() if k not in ("model.k", "model.h", "model.m")}
  specialize = dict(experiment=str(GPU_SMALL), source=args.get("source", "data_cache"),
                    budgets=(1_000_000,), reference=("configs/slm.py", gpu.SLM_TUNED))
  if args.get("time", True):
    specialize["time_of"] = "k=32,h=48,m=16"
  points = [{**p, "model.m": min(16, p["model.h"])}
            for p in product(**{"model.k": [16, 32], "model.h": [12, 24, 48]})]
  return dict(
      config="configs/pn.py",
      base=base,
      points=points,
      specialize=specialize,
      plot={"x": "pretrain_seconds"},
  )
