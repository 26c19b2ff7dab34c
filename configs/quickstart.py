"""Quickstart: a tiny PN on the bundled corpus, long enough on a CPU to watch the loss fall."""

from pn_jax.config import base_config, use_tiny
from pn_jax.config_args import NONE

ARGS = NONE


def get_config(arg=None):
  ARGS.parse(arg, __file__)
  c = use_tiny(base_config())
  c.name = "quickstart"
  c.model.update(mlp_kind="projected", k=4, h=8, m=4)
  c.train.update(steps=300, log_every=25, eval_every=100, checkpoint_every=100, progress_bar=True)
  c.optim.update(warmup_steps=30)
  return c
