"""Bench: a hard mixture of k dense GPT-2-small bench experts (gpt2_dense.py), one per cluster.

`:k=..` sets the number of experts; `:finetune` times one projected expert (a dense model).
"""

import pathlib

from pn_jax.config import load_module, parse_arg


def _gpt2_small(arg):
  return load_module(pathlib.Path(__file__).with_name("gpt2_dense.py")).gpt2_small(arg)


def get_config(arg=None):
  args = parse_arg(arg)
  c = _gpt2_small(arg)
  c.name = "gpt2_mix"
  c.model.update(mlp_kind="mixture", k=16)
  if args.get("size") == "tiny":
    c.model.k = 4
  if "k" in args:
    c.model.k = int(args["k"])
  if "finetune" in args or args.get("size") == "finetune":
    c.name = "gpt2_mix_projected_finetune"
    c.bench.project_finetune = True
  return c
