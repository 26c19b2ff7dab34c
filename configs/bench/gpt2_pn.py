"""Bench: a PN whose experts are the dense GPT-2-small bench model (gpt2_dense.py).

k=32 clusters, h=24 basis slices, codes of length m=16 (configs/pn.py's choice); override with
`:k=..,h=..,m=..`. `:finetune` times the projected small model instead (project() one expert of
a freshly initialised PN, then train the dense result).
"""

import pathlib

from pn_jax.config import load_module, parse_arg


def _gpt2_small(arg):
  return load_module(pathlib.Path(__file__).with_name("gpt2_dense.py")).gpt2_small(arg)


def get_config(arg=None):
  args = parse_arg(arg)
  c = _gpt2_small(arg)
  c.name = "gpt2_pn"
  c.model.update(mlp_kind="projected", k=32, h=24, m=16)
  if args.get("size") == "tiny":
    c.model.update(k=4, h=8, m=4)
  for key in ("k", "h", "m"):
    if key in args:
      c.model[key] = int(args[key])
  if "finetune" in args or args.get("size") == "finetune":
    c.name = "gpt2_pn_projected_finetune"
    c.bench.project_finetune = True
  return c
