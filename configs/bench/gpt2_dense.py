"""Bench: a dense GPT-2-small-shaped model (d 768, 12 layers, 12 heads, vocab 50304, seq 1024).

python -m pn_jax.bench --config=configs/bench/gpt2_dense.py        (H100: batch 32, bf16)
python -m pn_jax.bench --config=configs/bench/gpt2_dense.py:tiny   (CPU in seconds; tests)

`gpt2_small(args)` is shared by the PN and mixture bench configs (through `routed`), so all three
differ in the MLP kind alone. The `bench` block is read by pn_jax/bench.py only.
"""

import ml_collections

from pn_jax.config import base_config, use_tiny
from pn_jax.config_args import FLAG, INT, Accepts

ARGS = Accepts(words=("tiny",), keys=dict(batch=INT))


def gpt2_small(args: dict) -> ml_collections.ConfigDict:
  """The bench model; `args` as parsed by an `Accepts` (tiny, batch=<int>)."""
  c = base_config()
  c.model.update(vocab_size=50_304, d_model=768, n_layers=12, n_heads=12, mlp_dim=3072,
                 max_len=1024, mlp_kind="dense", dtype="bfloat16", remat="none",
                 attention="auto", logits_chunk=0, tie_embeddings=True,
                 scan_layers=False)  # unrolled layers: 65 vs 93 ms/step on H100 (benchmarks.md)
  c.data.update(seq_len=1024, batch_size=32, cluster_batching="homogeneous")
  c.optim.update(warmup_steps=10)
  c.train.update(steps=1000)
  c.bench = b = ml_collections.ConfigDict()
  b.warmup = 3  # untimed steps after compilation
  b.steps = 20  # timed steps; the step time is their median
  b.project_finetune = False  # PN/mixture: project one expert, then time the dense model's step
  b.cluster = 0  # the expert projected (and the homogeneous batches' cluster)
  # Extra configurations run in the same process, each one JSON line: ';'-separated sets of
  # ','-separated key=value overrides, e.g. "model.logits_chunk=256;model.remat=dots".
  b.sweep = ""
  if "tiny" in args:
    use_tiny(c)
    c.data.update(seq_len=64, batch_size=8)
    b.update(warmup=1, steps=3)
  if "batch" in args:
    c.data.batch_size = args["batch"]
  return c


def get_config(arg=None):
  c = gpt2_small(ARGS.parse(arg, __file__))
  c.name = "gpt2_dense"
  return c


def routed_args(full: dict) -> Accepts:
  """A routed bench config's arguments: the dense ones, its `full` keys (k/h/m) and finetune."""
  return Accepts(words=("tiny", "finetune"),
                 keys=dict(ARGS.keys, **{key: INT for key in full}, finetune=FLAG))


def routed(args: dict, name: str, mlp_kind: str, full: dict,
           tiny: dict) -> ml_collections.ConfigDict:
  """gpt2_small with a routed MLP: `full` sets its k/h/m, `tiny` replaces them under `:tiny`, and
  `:key=..` overrides any of them; `:finetune` (or finetune=1) times one projected expert (a
  dense model). `args` as parsed by `routed_args(full)`."""
  c = gpt2_small(args)
  c.name = name
  c.model.update(mlp_kind=mlp_kind, **full)
  if "tiny" in args:
    c.model.update(**tiny)
  for key in full:
    if key in args:
      c.model[key] = args[key]
  if args.get("finetune"):
    c.name = f"{name}_projected_finetune"
    c.bench.project_finetune = True
  return c
