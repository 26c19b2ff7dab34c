"""XLA flags for fast GPU training, set in XLA_FLAGS before jax initialises its backend.

XLA reads XLA_FLAGS once, when the first backend starts (the first `jax.devices()`, array or
jit call), so `apply()` must run before that; importing jax is fine. The flags are added only
when a CUDA GPU will be used, so CPU runs (tests, CI) see XLA_FLAGS untouched. Flags the user
already set win: we never override a flag that XLA_FLAGS already names.

Measured effect on one H100 (docs/benchmarks.md): the latency-hiding scheduler mostly matters for
multi-GPU collectives; the bench records the effective XLA_FLAGS so every number can be rerun.
"""

from __future__ import annotations

import importlib.util
import os

# One H100/H200 and up: overlap collectives with compute (multi-GPU; harmless on one GPU).
GPU_FLAGS = (
    "--xla_gpu_enable_latency_hiding_scheduler=true",
)

PRESETS = {"none": (), "default": GPU_FLAGS}


def gpu_expected() -> bool:
  """True when jax will pick a CUDA backend, decided without initialising jax."""
  platforms = os.environ.get("JAX_PLATFORMS", "").lower()
  if platforms and not any(p in platforms for p in ("cuda", "gpu")):
    return False
  if not os.path.exists("/dev/nvidiactl"):
    return False
  return any(_installed(name) for name in ("jax_cuda13_plugin", "jax_cuda12_plugin",
                                           "jax_plugins.xla_cuda12", "jax_plugins.xla_cuda13"))


def _installed(module: str) -> bool:
  try:  # find_spec("a.b") imports "a", which raises when "a" itself is missing
    return importlib.util.find_spec(module) is not None
  except ModuleNotFoundError:
    return False


def merge(existing: str, flags) -> str:
  """Appends each flag whose name `existing` does not already set."""
  names = {f.split("=", 1)[0] for f in existing.split()}
  added = [f for f in flags if f.split("=", 1)[0] not in names]
  return " ".join(filter(None, [existing.strip(), *added]))


def apply(preset: str = "default", extra: str = "", *, force: bool = False) -> str:
  """Sets XLA_FLAGS for `preset` (+ `extra` flags) on GPU machines; returns the effective value.

  `force=True` adds the flags even where no GPU is detected (for inspection and tests).
  """
  if preset not in PRESETS:
    raise ValueError(f"unknown XLA flag preset {preset!r}; choose one of {sorted(PRESETS)}")
  current = os.environ.get("XLA_FLAGS", "")
  if force or gpu_expected():
    flags = extra.split() + list(PRESETS[preset])  # extra first: it wins over the preset
    current = merge(current, flags)
    os.environ["XLA_FLAGS"] = current
  return current
