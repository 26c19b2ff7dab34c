"""SLM: the small dense model (the inference budget). Paper Table 6: 7 layers, d 1024, MLP 4096."""

from pn_jax.config import base_config, use_tiny
from pn_jax.config_args import Accepts

ARGS = Accepts(words=("tiny",))


def get_config(arg=None):
  args = ARGS.parse(arg, __file__)
  c = base_config()
  c.name = "slm"
  c.model.update(d_model=1024, n_layers=7, n_heads=8, mlp_dim=4096, mlp_kind="dense")
  if "tiny" in args:
    use_tiny(c)
  return c
