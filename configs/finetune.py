"""Specialization: fine-tune a pretrained run on one domain's limited data (mode specialize).

    python -m pn_jax.main --config=configs/finetune.py:tiny --config.init_from=runs/pn \
        --config.data.domain=legal --workdir=runs/pn_legal --mode=specialize

The model comes from the checkpoint in init_from (PN/mixture: projected onto one expert; dense:
as is), so `model` here is ignored. Paper (Sec. 3): Adam, lr 1e-4 / 3 for 1M domain tokens with
early stopping (< 2k steps), 1e-4 and at most 4k / 30k steps for 8M / 64M.
Args: `tiny`, `tokens=<domain training tokens>`, `select=frequent|lowest_loss|shares`.
"""

from pn_jax.config import SELECT_RULES, base_config, use_tiny
from pn_jax.config_args import NUMBER, Accepts, one_of

ARGS = Accepts(words=("tiny",), keys=dict(tokens=NUMBER, select=one_of(*SELECT_RULES)))


def get_config(arg=None):
  args = ARGS.parse(arg, __file__)
  c = base_config()
  c.name = "finetune"
  c.optim.update(lr=1e-4 / 3, warmup_steps=0, min_lr_ratio=1.0)  # constant lr + early stopping
  c.train.update(steps=2000, eval_every=100, checkpoint_every=100, early_stop_patience=3)
  c.data.update(domain_tokens=1_000_000, eval_batches=10_000)  # eval: the whole held-out split
  if "tiny" in args:
    use_tiny(c)
    c.optim.update(lr=1e-3, warmup_steps=0, min_lr_ratio=1.0)
    c.train.update(steps=200, eval_every=10, checkpoint_every=10, early_stop_patience=3,
                   log_every=5)
    c.data.update(domain_tokens=0, eval_batches=10_000)
  if "tokens" in args:
    c.data.domain_tokens = args["tokens"]
  if "select" in args:
    c.specialize.select = args["select"]
  return c
