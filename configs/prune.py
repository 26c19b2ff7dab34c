"""SLM-prune: the pretrained LLM cut to the SLM's widths, repaired without training (mode prune).

    python -m pn_jax.main --mode=prune --config=configs/prune.py --config.init_from=runs/llm \
        --workdir=runs/llm_pruned

Then specialize runs/llm_pruned like any dense run (--config.init_from=runs/llm_pruned). The
model comes from init_from (its `model` here is ignored); the pruned widths are configs/slm.py's
(d_model 1024, MLP 4096), and whole heads are kept at the LLM's head_dim (configs/llm.py: 2816 /
22 = 128, so 8 heads: the SLM's own shape). pn_jax/specialize/structured_pruning.py says how.
Args: `tiny` (the tiny SLM's widths, 64 / 256, for a tiny LLM).
"""

from pn_jax.config import base_config, use_tiny
from pn_jax.config_args import Accepts

ARGS = Accepts(words=("tiny",))


def get_config(arg=None):
  args = ARGS.parse(arg, __file__)
  c = base_config()
  c.name = "prune"
  c.prune.update(d_model=1024, mlp_dim=4096)
  c.data.eval_batches = 100  # the pruned model's generic validation ppl (prune.json)
  if "tiny" in args:
    use_tiny(c)
    c.prune.update(d_model=64, mlp_dim=256, calibration_batches=4)
  return c
