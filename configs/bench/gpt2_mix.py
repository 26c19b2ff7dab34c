"""Bench: a hard mixture of k dense GPT-2-small bench experts (gpt2_dense.py), one per cluster.

`:k=..` sets the number of experts; `:finetune` times one projected expert (a dense model).
"""

import pathlib

from pn_jax.config import load_module


def get_config(arg=None):
  dense = load_module(pathlib.Path(__file__).with_name("gpt2_dense.py"))
  return dense.routed(arg, "gpt2_mix", "mixture", full=dict(k=16), tiny=dict(k=4))
