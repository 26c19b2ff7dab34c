"""cpu_small with 5x the generic pretraining tokens, for SLM, SLM-mix and PN (and the PN/mixture
variants) only: does PN's deficit at cpu_small's scale shrink when each expert is trained on more
data (the paper's 100 -> 400 GPUh rows)?

    python -m pn_jax.experiment --config=configs/experiments/cpu_pretrain5x.py \\
        --root=runs/exp_cpu_pretrain5x --figure=results_ppl_vs_cost_pretrain5x.png

The generic subset is 5x larger (a superset of cpu_small's: same seed, same document order),
the domain splits and the tokenizer are cpu_small's (`tokenizer_from`), so the domain test
perplexities are comparable with cpu_small's row for row.
"""

import pathlib

import ml_collections

from pn_jax.config import load_module
from pn_jax.config_args import NONE


ARGS = NONE  # cpu_small's `codes` keeps methods this file picks from: no argument


def get_config(arg=None):
  ARGS.parse(arg, __file__)
  c = load_module(pathlib.Path(__file__).with_name("cpu_small.py")).get_config(None)
  c.generic_chars *= 5
  c.pretrain_tokens *= 5
  c.tokenizer_from = "runs/exp_cpu_small/tokenizer.model"
  c.methods = ml_collections.ConfigDict(
      {k: c.methods[k] for k in ("slm", "mix", "mix_shared", "pn", "pn_homogeneous")})
  c.distill = False
  return c
