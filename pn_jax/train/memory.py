"""The device memory a compiled step holds, and the error for one that does not fit.

Shared by the ahead-of-time compile (pn_jax/aot.py: against a TPU chip's HBM) and the benchmark
(pn_jax/bench.py: against the device it runs on); no jax import, so aot can load it before it
sets up libtpu.
"""

from __future__ import annotations

from pn_jax.config import ConfigError

GIB = 2**30


class DoesNotFit(ConfigError):
  """The compiled step needs more memory per device than the device has (a user error: exit 2)."""


def step_bytes(mem) -> int:
  """Per-device bytes a compiled step holds while it runs (its `memory_analysis()`): arguments +
  outputs - donated (aliased) + temps + code."""
  return (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
          + mem.temp_size_in_bytes + mem.generated_code_size_in_bytes)
