"""Quickstart: a tiny PN on the bundled corpus, long enough on a CPU to watch the loss fall.

Architecture gpt (GELU MLP) by default; `arch=llama`: Llama's gated SiLU MLP (docs/design.md).
"""

from pn_jax.config import base_config, use_arch, use_tiny
from pn_jax.config_args import ARCH, Accepts

ARGS = Accepts(keys=dict(arch=ARCH))


def get_config(arg=None):
  args = ARGS.parse(arg, __file__)
  c = use_tiny(base_config())
  c.name = "quickstart"
  c.model.update(mlp_kind="projected", k=4, h=8, m=4)
  c.train.update(steps=300, log_every=25, eval_every=100, checkpoint_every=100, progress_bar=True)
  c.optim.update(warmup_steps=30)
  use_arch(c, args.get("arch", "gpt"))
  return c
