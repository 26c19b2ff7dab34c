"""SLM: the small dense model (the inference budget). Paper Table 6: 7 layers, d 1024, MLP 4096.

Architecture gpt (GELU MLP) by default; `arch=llama`: Llama's gated SiLU MLP (docs/design.md).
"""

from pn_jax.config import base_config, use_arch, use_tiny
from pn_jax.config_args import ARCH, Accepts

ARGS = Accepts(words=("tiny",), keys=dict(arch=ARCH))


def get_config(arg=None):
  args = ARGS.parse(arg, __file__)
  c = base_config()
  c.name = "slm"
  c.model.update(d_model=1024, n_layers=7, n_heads=8, mlp_dim=4096, mlp_kind="dense")
  if "tiny" in args:
    use_tiny(c)
  use_arch(c, args.get("arch", "gpt"))
  return c
