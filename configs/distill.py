"""SLM-d: fine-tune a pretrained SLM on a domain against a fine-tuned LLM's soft targets.

    python -m pn_jax.main --config=configs/distill.py:tiny --config.init_from=runs/slm \
        --config.distill.teacher=runs/llm_legal --config.data.domain=legal \
        --workdir=runs/slmd_legal --mode=specialize

Same fine-tuning as configs/finetune.py (early stopping on the domain's validation LM loss);
the training loss is (1 - w) * LM loss + w * tau^2 * KL(teacher_tau || student_tau).
"""

import os

from pn_jax.config import load_module


_FINETUNE = load_module(os.path.join(os.path.dirname(os.path.abspath(__file__)), "finetune.py"))
ARGS = _FINETUNE.ARGS


def get_config(arg=None):
  ARGS.parse(arg, __file__)  # named after this file when refused
  c = _FINETUNE.get_config(arg)
  c.name = "distill"
  c.specialize.expect_kind = "dense"
  c.distill.update(temperature=2.0, weight=0.5)
  return c
