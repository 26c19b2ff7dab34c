"""Bytes a compiled step moves through collectives, read from its HLO (per device, per step).

Why: data-parallel efficiency is set by the gradient all-reduce (docs/benchmarks.md, "Scaling":
a PN all-reduces ~12x the dense model's bytes), and a change that cuts those bytes can be checked
from the compiled program on CPU fake devices, without the GPUs it is for. The count is of each
collective's result (after XLA's combiners: a tuple counts every element); an async pair counts
its start only.
"""

from __future__ import annotations

import re

# Element sizes of HLO primitive types (bytes).
_SIZES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2,
          "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8,
          "c128": 16}
KINDS = ("all-reduce", "reduce-scatter", "all-gather", "all-to-all", "collective-permute")
# `%name = <result shape> <op>(` with op a collective or an async collective's start.
_OP = re.compile(r"=\s*(?P<shape>\(.*?\)|\S+)\s+(?P<op>" + "|".join(KINDS)
                 + r")(?P<start>-start)?\(")
_ARRAY = re.compile(r"\b(?P<dtype>[a-z]+[0-9]*)\[(?P<dims>[0-9,]*)\]")


def _bytes(shape: str) -> float:
  total = 0.0
  for m in _ARRAY.finditer(shape):
    size = _SIZES.get(m["dtype"]) if not m["dtype"].startswith("f8") else 1
    if size is None:
      continue  # a token or opaque type: no payload
    n = 1
    for d in filter(None, m["dims"].split(",")):
      n *= int(d)
    total += n * size
  return total


def collective_bytes(hlo_text: str) -> dict[str, int]:
  """{collective kind: bytes of its results per step and device} of a compiled module's HLO text
  (every kind of KINDS present, 0 where absent). An async all-gather or collective-permute start
  returns (operand, result[, context]): only its result counts."""
  out = dict.fromkeys(KINDS, 0.0)
  for line in hlo_text.splitlines():
    m = _OP.search(line)
    if not m:
      continue
    shape = m["shape"]
    if m["start"] and m["op"] in ("all-gather", "collective-permute") and shape.startswith("("):
      arrays = list(_ARRAY.finditer(shape))
      shape = arrays[1].group(0) if len(arrays) > 1 else shape
    out[m["op"]] += _bytes(shape)
  return {k: int(v) for k, v in out.items()}
