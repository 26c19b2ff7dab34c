"""PN: a projected network whose experts are SLM-sized dense models (paper Sec. 2.5).

k experts (= clusters of the generic data), h basis slices of each shared MLP tensor, and
codes of length m. The paper's main run has k=32; h and m are not given: h=24 matches its
reported 1,422M parameters for k=32 with our SLM, and m=16 (<= h) is our choice (docs/design.md).
`1b`: a 7B-class PN whose experts are ~0.9B dense models (d 2048, 16 layers, MLP 8192; k=32,
h=12, m=8: 6.8B parameters), for sizing TPU slices (docs/scale.md).
Architecture gpt (GELU MLP) by default; `arch=llama`: Llama's gated SiLU MLP (docs/design.md).
"""

from pn_jax.config import base_config, use_arch, use_tiny
from pn_jax.config_args import ARCH, INT, Accepts

ARGS = Accepts(words=("tiny", "1b"), keys=dict(k=INT, h=INT, m=INT, arch=ARCH))


def get_config(arg=None):
  args = ARGS.parse(arg, __file__)
  c = base_config()
  c.name = "pn"
  c.model.update(d_model=1024, n_layers=7, n_heads=8, mlp_dim=4096, mlp_kind="projected",
                 k=32, h=24, m=16)
  if "1b" in args:
    c.name = "pn_1b"
    c.model.update(d_model=2048, n_layers=16, n_heads=16, mlp_dim=8192, h=12, m=8)
  if "tiny" in args:
    use_tiny(c)
    c.model.update(k=4, h=8, m=4)
  for key in ("k", "h", "m"):
    if key in args:
      c.model[key] = args[key]
  use_arch(c, args.get("arch", "gpt"))
  return c
