"""Shared-attention hard mixture: k expert MLPs, attention/embeddings/norms shared, hard-routed.

This is PN's special case h = k, E = I, M = I (pn_jax/model/mlp.py), *not* the paper's SLM-mix
baseline, which shares nothing (configs/mix.py). Kept as a variant to separate what sharing
attention buys from what the projection buys.
"""

from pn_jax.config import base_config, parse_arg, use_tiny


def get_config(arg=None):
  args = parse_arg(arg)
  c = base_config()
  c.name = "mix_shared"
  c.model.update(d_model=1024, n_layers=7, n_heads=8, mlp_dim=4096, mlp_kind="mixture", k=16)
  if args.get("size") == "tiny":
    use_tiny(c)
    c.model.k = 4
  if "k" in args:
    c.model.k = int(args["k"])
  return c
