"""Bench: a hard mixture of k dense GPT-2-small bench experts (gpt2_dense.py), one per cluster.

`:k=..` sets the number of experts; `:finetune` times one projected expert (a dense model).
"""

import pathlib

from pn_jax.config import load_module


_DENSE = load_module(pathlib.Path(__file__).with_name("gpt2_dense.py"))
FULL = dict(k=16)
ARGS = _DENSE.routed_args(FULL)


def get_config(arg=None):
  return _DENSE.routed(ARGS.parse(arg, __file__), "gpt2_mix", "mixture", full=FULL,
                       tiny=dict(k=4))
