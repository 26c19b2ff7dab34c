"""SLM-is: a small dense model pretrained from scratch on generic data importance-resampled to
match one domain's cluster histogram (mode `importance`), then fine-tuned (mode `specialize`).

    python -m pn_jax.main --config=configs/importance.py:tiny --config.data.domain=legal \
        --workdir=runs/slmis_legal --mode=importance

Paper: k = 1024 clusters for the histogram. model.k is only the number of data clusters here;
the model is the SLM (dense). Arg `k=<clusters>`.
"""

from pn_jax.config import base_config, use_tiny
from pn_jax.config_args import INT, Accepts

ARGS = Accepts(words=("tiny",), keys=dict(k=INT))


def get_config(arg=None):
  args = ARGS.parse(arg, __file__)
  c = base_config()
  c.name = "slm_is"
  c.model.update(d_model=1024, n_layers=7, n_heads=8, mlp_dim=4096, mlp_kind="dense", k=1024)
  c.data.cluster_batching = "mixed"
  c.data.domain_tokens = 1_000_000  # the domain set whose histogram is matched
  if "tiny" in args:
    use_tiny(c)
    c.model.k = 16
    c.data.domain_tokens = 0
  if "k" in args:
    c.model.k = args["k"]
  return c
