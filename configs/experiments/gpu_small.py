"""The paper's comparison on one GPU: a miniature of its regime, every method, sized for an H200.

    python -m pn_jax.experiment --config=configs/experiments/gpu_small.py --root=runs/exp_gpu

On the lent device machine (prepared corpus and wheels carried, stages resumed call after call):
`python launch/gpu_experiment.py pack` here, then `bash launch/gpu_experiment.sh
configs/experiments/gpu_small.py` there until it prints `PN_EXPERIMENT done` (docs/launch.md).

The miniature (../shared/MEASURED.md): the SLM has d_model 128, 4 layers, MLP 512 (~0.8M
non-embedding parameters), vocab 8k, context 1,024, batch 32, so the generic budget gives it
~`pretrain_tokens / 0.8M` tokens per parameter (the paper: ~350 at 100 GPUh). The LLM is ~4x the
SLM's inference cost; PN k=32, h=24, m=16 (configs/pn.py's h/k/m); SLM-mix k=16 independent SLMs;
SLM-is k=1024 clusters (the paper's). Domains: three at 1M tokens and the two that hold 8M
(dictionary, source_code); a (domain, budget) cell whose domain holds fewer training tokens than
the budget is skipped. Fine-tuning follows the paper's lr rule (experiment.finetune).
Arg `validate` shrinks it to a few-minute run that exercises every stage of the runner (on an
H200: 514 s in two calls, docs/results.md). The full config needs an estimated 30-40 minutes of
device time (preparation ~4, pretraining ~5, SLM-is ~6, ~75 fine-tuning cells ~15-25); to fit
one session's 30 minutes drop a 1M-only domain or SLM-is's 8M cells (`--config.domains=...`).
"""

import pathlib

import ml_collections

from pn_jax.config import load_module, parse_arg

SLM = "model.d_model=128,model.n_layers=4,model.n_heads=4,model.mlp_dim=512"
LLM = "model.d_model=256,model.n_layers=4,model.n_heads=4,model.mlp_dim=1024"


def get_config(arg=None):
  args = parse_arg(arg)
  c = load_module(pathlib.Path(__file__).with_name("cpu_small.py")).get_config(None)
  c.source = "data_cache"
  c.generic_chars = 400_000_000  # the whole prepared generic set (~137 MB)
  c.heldout_chars = 1_000_000  # per held-out split: ~250k tokens, 8 eval batches of 32k
  c.domain_train_chars = 40_000_000  # >= 8M tokens where the domain has them
  c.domains = ("legal", "religious", "manpages", "dictionary", "source_code")
  c.budgets = (1_000_000, 8_000_000)
  c.vocab_size = 8192
  c.seq_len = 1024
  c.batch_size = 32
  c.pretrain_tokens = 120_000_000  # ~150 tokens per SLM parameter, ~2.4 epochs of generic
  c.pretrain_lr = 2e-3
  c.eval_batches = 16
  c.methods = ml_collections.ConfigDict(dict(
      slm=("configs/slm.py", SLM),
      mix=("configs/mix.py", SLM + ",model.k=16"),
      mix_shared=("configs/mix_shared.py", SLM + ",model.k=16"),
      pn=("configs/pn.py", SLM + ",model.k=32,model.h=24,model.m=16"),
      llm=("configs/llm.py", LLM),
      slm_is=("configs/importance.py", SLM + ",model.k=1024"),
  ))
  c.distill = True
  c.finetune.update(steps=2000, eval_every=25, early_stop_patience=3, eval_batches=8)
  if args.get("size") == "validate":
    c.domains = ("legal", "dictionary")
    c.pretrain_tokens = 8_000_000
    c.methods = ml_collections.ConfigDict(
        {k: v for k, v in c.methods.items() if k in ("slm", "mix", "pn", "llm", "slm_is")})
    c.finetune.update(steps=200)
  return c
