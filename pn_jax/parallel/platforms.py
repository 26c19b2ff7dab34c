"""The jax platforms an entry point starts when the user has not chosen (JAX_PLATFORMS unset).

With libtpu installed (the `tpu` and `test` extras) jax's default start-up loads it to probe for
a TPU even where there is none, and libtpu prints ~5 lines to stderr (one an `E...
INVALID_ARGUMENT` line, none through Python's logging) before jax falls back to the GPU or CPU.
So where no TPU device file exists, `skip_absent_tpu` (cli.parse_flags, before anything starts a
backend) leaves the TPU out; the rest stays jax's choice. A JAX_PLATFORMS the user set is never
touched. `pn_jax.aot` is unaffected: it compiles for a TPU topology through libtpu directly, not
through a TPU backend (its host backend is the CPU).
"""

from __future__ import annotations

import glob
import importlib.util
import os

from pn_jax.parallel import xla_flags

# A TPU chip on the host: /dev/accel<N> (v2-v5p), or a VFIO group /dev/vfio/<N> (v5e and later).
TPU_DEVICE_FILES = ("/dev/accel*", "/dev/vfio/[0-9]*")
# An AMD GPU (ROCm): jax's choice is left alone there, as pn-jax names no ROCm platform.
AMD_GPU_FILES = ("/dev/kfd",)


def default_platforms(environ=None, files=glob.glob) -> str | None:
  """The jax_platforms to set, or None to leave jax's choice: JAX_PLATFORMS is set (even empty),
  libtpu is absent (nothing would probe), or a TPU or an AMD GPU is attached (`files`: pattern ->
  the device files that match). Else the CUDA GPU when jax will use one
  (xla_flags.gpu_expected), and the CPU."""
  environ = os.environ if environ is None else environ
  if "JAX_PLATFORMS" in environ or importlib.util.find_spec("libtpu") is None:
    return None
  if any(files(pattern) for pattern in TPU_DEVICE_FILES + AMD_GPU_FILES):
    return None
  return "cuda,cpu" if xla_flags.gpu_expected() else "cpu"


def skip_absent_tpu() -> str | None:
  """Sets jax_platforms to `default_platforms()` where that is not None; -> the value set."""
  platforms = default_platforms()
  if platforms is not None:
    import jax
    jax.config.update("jax_platforms", platforms)
  return platforms
