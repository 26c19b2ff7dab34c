"""Shared-attention hard mixture: k expert MLPs, attention/embeddings/norms shared, hard-routed.

This is PN's special case h = k, E = I, M = I (pn_jax/model/mlp.py), *not* the paper's SLM-mix
baseline, which shares nothing (configs/mix.py). Kept as a variant to separate what sharing
attention buys from what the projection buys.
Architecture gpt (GELU MLP) by default; `arch=llama`: Llama's gated SiLU MLP (docs/design.md).
"""

from pn_jax.config import base_config, use_arch, use_tiny
from pn_jax.config_args import ARCH, INT, Accepts

ARGS = Accepts(words=("tiny",), keys=dict(k=INT, arch=ARCH))


def get_config(arg=None):
  args = ARGS.parse(arg, __file__)
  c = base_config()
  c.name = "mix_shared"
  c.model.update(d_model=1024, n_layers=7, n_heads=8, mlp_dim=4096, mlp_kind="mixture", k=16)
  if "tiny" in args:
    use_tiny(c)
    c.model.k = 4
  if "k" in args:
    c.model.k = args["k"]
  use_arch(c, args.get("arch", "gpt"))
  return c
