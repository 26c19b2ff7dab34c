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


# Runnable benchmark scripts kept in configs/bench beside the bench configs (torch_peer.py reads
# them; mlp_probe.py times one MLP matrix): not config files, so the every-config-file tests
# leave them out.
CONFIG_SCRIPTS = ("configs/bench/torch_peer.py", "configs/bench/mlp_probe.py")


def load_config(name: str, arg: str = "tiny"):
  """configs/<name>.py:get_config(arg), as the CLI would load it."""
  from pn_jax.config import load_config as load
  return load(f"{REPO / 'configs' / name}.py:{arg}")


@pytest.fixture
def tiny_config():
  return load_config


TINY_GENERIC = REPO / "pn_jax" / "data" / "assets" / "tiny" / "generic"


def copy_workdir(prepared, tmp_path, name="run") -> str:
  """A new run directory reusing prepared data artefacts (tokenizer, clusters, packed data)."""
  import shutil
  workdir = tmp_path / name
  shutil.copytree(prepared, workdir)
  return str(workdir)


def write_small_corpus(root, limit: int = 200_000):
  """A ~`limit`-byte slice of the bundled generic corpus under root/generic: data prep in ~2 s."""
  (root / "generic").mkdir(parents=True)
  for split, cap in (("train", limit), ("validation", limit // 10), ("test", limit // 10)):
    lines, size = [], 0
    for line in (TINY_GENERIC / f"{split}.jsonl").read_text().splitlines(keepends=True):
      if size > cap:
        break
      lines.append(line)
      size += len(line)
    (root / "generic" / f"{split}.jsonl").write_text("".join(lines))
  return root


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  """A workdir with the tiny corpus's tokenizer/clusters/packed data, built once per module."""
  from pn_jax.data import pipeline
  workdir = tmp_path_factory.mktemp("prepared")
  pipeline.prepare_run_data(load_config("pn"), str(workdir))
  return workdir


def snapshot(root, ignore=()) -> dict:
  """Every file and directory under `root` (relative path -> size, mtime_ns, sha256; '' for a
  directory), except the names in `ignore`: "nothing was written there" is `before == after`."""
  import hashlib
  out = {}
  for path in sorted(pathlib.Path(root).rglob("*")):
    if path.name in ignore:
      continue
    st = path.lstat()
    digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else ""
    out[str(path.relative_to(root))] = (st.st_size, st.st_mtime_ns, digest)
  return out


def quiet(config, **train):
  """A run config for tests: no progress bar, synchronous checkpoints, plus `train` settings."""
  config.train.update(progress_bar=False, async_checkpoint=False, **train)
  return config


def train_tiny_pn(prepared, directory, steps: int, checkpoint_every: int = 2) -> str:
  """A tiny PN pretrained for `steps` in directory/run (a copy of the `prepared` data)."""
  import shutil
  from pn_jax.modes.pretrain import pretrain
  workdir = directory / "run"
  shutil.copytree(prepared, workdir)
  config = quiet(load_config("pn"), steps=steps, checkpoint_every=checkpoint_every,
                 eval_every=100)
  pretrain(config, str(workdir))
  return workdir


def train_batches(config, run_data, process_index: int = 0, process_count: int = 1):
  """batches.train_batches with the values a run passes from its config."""
  from pn_jax.data import batches
  return batches.train_batches(run_data, batch_size=config.data.batch_size,
                               mode=config.data.cluster_batching, seed=config.seed,
                               shard=batches.Shard(process_index, process_count))


def eval_batches(config, run_data, split: str = "validation", process_index: int = 0,
                 process_count: int = 1):
  """batches.eval_batches with the values train.loop.heldout_loss passes from its config."""
  from pn_jax.data import batches
  d = config.data
  return batches.eval_batches(run_data, split=split, domain=d.get("domain", "") or "",
                              batch_size=d.batch_size, max_batches=d.eval_batches,
                              mode=d.cluster_batching,
                              shard=batches.Shard(process_index, process_count))


def offset_params(model, seed: int = 0):
  """The model's init params (key `seed`), each moved off its init by 0.05 * N(0, 1) (key
  seed + 1): every expert differs, so no equivalence test can pass by symmetry."""
  import flax.linen as nn
  import jax
  from pn_jax.model.transformer import init_params
  params = nn.unbox(init_params(model, jax.random.key(seed)))
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
  return treedef.unflatten([p + 0.05 * jax.random.normal(k, p.shape)
                            for p, k in zip(leaves, keys)])


def random_batch(config, seed: int = 0, cluster=None) -> dict:
  """A host batch of random tokens of the config's shape; `cluster` [B] (default: random ids)."""
  import numpy as np
  rng = np.random.default_rng(seed)
  B, T, V = config.data.batch_size, config.data.seq_len, config.model.vocab_size
  batch = {"inputs": rng.integers(0, V, (B, T), dtype=np.int32),
           "targets": rng.integers(0, V, (B, T), dtype=np.int32),
           "mask": np.ones((B, T), np.float32)}
  batch["cluster"] = (rng.integers(0, config.model.k, (B,), dtype=np.int32) if cluster is None
                      else cluster)
  return batch


class FullDisk:
  """A filesystem under `root` that runs out of space: once `allow` files have been written
  there (through Python's open/io.open/os.fdopen: json, jsonl, npz, copies), the next write()
  raises ENOSPC, as a full disk does. Files elsewhere are untouched. `install(monkeypatch)`."""

  def __init__(self, root, allow: int = 0):
    import io
    import os
    self.root, self.allow, self.written, self.failed = os.path.realpath(root), allow, 0, []
    self._open, self._io_open, self._fdopen = open, io.open, os.fdopen

  def _inside(self, path) -> bool:
    import os
    return isinstance(path, (str, os.PathLike)) and os.path.realpath(path).startswith(
        self.root + os.sep)

  def _wrap(self, f, path):
    disk = self

    class Filling:
      def __getattr__(self, name):
        return getattr(f, name)

      def __enter__(self):
        return self

      def __exit__(self, *exc):
        self.close()

      def __iter__(self):
        return iter(f)

      def write(self, data):
        if disk.written >= disk.allow:
          disk.failed.append(str(path))
          raise OSError(28, "No space left on device")
        return f.write(data)

      def close(self):
        disk.written += 1
        return f.close()

    return Filling()

  def open(self, file, mode="r", *args, **kwargs):
    f = self._io_open(file, mode, *args, **kwargs)
    writing = any(c in mode for c in "wax+")
    return self._wrap(f, file) if writing and self._inside(file) else f

  def fdopen(self, fd, mode="r", *args, **kwargs):
    import os
    f = self._fdopen(fd, mode, *args, **kwargs)
    path = os.readlink(f"/proc/self/fd/{fd}")
    return self._wrap(f, path) if any(c in mode for c in "wax+") and self._inside(path) else f

  def install(self, monkeypatch):
    import builtins
    import io
    import os
    monkeypatch.setattr(builtins, "open", self.open)
    monkeypatch.setattr(io, "open", self.open)
    monkeypatch.setattr(os, "fdopen", self.fdopen)
    return self


def temp_files(root) -> list[str]:
  """Files under `root` that a writer leaves only when it did not clean up after a failure."""
  return sorted(str(p) for p in pathlib.Path(root).rglob("*")
                if ".tmp" in p.name or p.name.endswith(".training") or ".new-" in p.name)
