"""Test setup: 8 fake CPU devices (set before jax is imported) and tiny configs."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Many tests compile the same tiny programs (each run builds fresh jit closures): a persistent
# compilation cache shared by the xdist workers turns repeat compiles into disk reads.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", "/tmp/pn_jax_test_jit_cache")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import pathlib  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def load_config(name: str, arg: str = "tiny"):
  """configs/<name>.py:get_config(arg), as the CLI would load it."""
  import importlib.util
  spec = importlib.util.spec_from_file_location(f"cfg_{name}", REPO / "configs" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


@pytest.fixture
def tiny_config():
  return load_config
