"""Bench: a PN whose experts are the dense GPT-2-small bench model (gpt2_dense.py).

k=32 clusters, h=24 basis slices, codes of length m=16 (configs/pn.py's choice); override with
`:k=..,h=..,m=..`. `:finetune` times the projected small model instead (project() one expert of
a freshly initialised PN, then train the dense result).
"""

import pathlib

from pn_jax.config import load_module


_DENSE = load_module(pathlib.Path(__file__).with_name("gpt2_dense.py"))
FULL = dict(k=32, h=24, m=16)
ARGS = _DENSE.routed_args(FULL)


def get_config(arg=None):
  return _DENSE.routed(ARGS.parse(arg, __file__), "gpt2_pn", "projected", full=FULL,
                       tiny=dict(k=4, h=8, m=4))
