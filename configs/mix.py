"""SLM-mix (the paper's baseline): k independent small models (the SLM's shape), one per cluster.

No parameter is shared: every expert is a whole dense SLM trained on its own cluster's sequences
(pn_jax/model/independent_experts.py). Batches are stratified, batch_size/k sequences per expert, so the
batch size is rounded up to a multiple of k. Specialization fine-tunes the domain's most frequent
cluster's model. For the shared-attention hard mixture (a PN special case) see mix_shared.py.
Architecture gpt (GELU MLP) by default; `arch=llama`: Llama's gated SiLU MLP (docs/design.md).
"""

from pn_jax.config import base_config, use_arch, use_tiny
from pn_jax.config_args import ARCH, INT, Accepts

ARGS = Accepts(words=("tiny",), keys=dict(k=INT, arch=ARCH))


def get_config(arg=None):
  args = ARGS.parse(arg, __file__)
  c = base_config()
  c.name = "mix"
  c.model.update(d_model=1024, n_layers=7, n_heads=8, mlp_dim=4096, mlp_kind="dense", k=16,
                 independent_experts=True)
  c.data.cluster_batching = "stratified"
  if "tiny" in args:
    use_tiny(c)
    c.model.k = 4
  if "k" in args:
    c.model.k = args["k"]
  c.data.batch_size = -(-c.data.batch_size // c.model.k) * c.model.k
  use_arch(c, args.get("arch", "gpt"))
  return c
