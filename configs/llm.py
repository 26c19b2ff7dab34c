"""LLM: the large dense reference (~4x the SLM's inference cost). Paper: d 2816, 22 heads, MLP 11264.

Architecture gpt (GELU MLP) by default; `arch=llama`: Llama's gated SiLU MLP (docs/design.md).
"""

from pn_jax.config import base_config, use_arch, use_tiny
from pn_jax.config_args import ARCH, Accepts

ARGS = Accepts(words=("tiny",), keys=dict(arch=ARCH))


def get_config(arg=None):
  args = ARGS.parse(arg, __file__)
  c = base_config()
  c.name = "llm"
  c.model.update(d_model=2816, n_layers=7, n_heads=22, mlp_dim=11264, mlp_kind="dense")
  if "tiny" in args:
    use_tiny(c)
    c.model.update(d_model=128, n_heads=4, mlp_dim=512)  # ~4x the tiny SLM's MLP/attention
  use_arch(c, args.get("arch", "gpt"))
  return c
