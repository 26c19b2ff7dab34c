"""The GPU runner's transport: the corpus packed here and unpacked there reads back identically."""

import importlib.util

from conftest import REPO
from pn_jax.data import corpus as corpus_lib


def _runner():
  spec = importlib.util.spec_from_file_location("gpu_experiment",
                                                REPO / "launch" / "gpu_experiment.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_packed_corpus_unpacks_to_the_same_documents(tmp_path):
  runner = _runner()
  carry, there = tmp_path / "carry", tmp_path / "there"
  info = runner.pack(corpus_lib.TINY_ROOT, str(carry), ["legal"], wheels=())
  assert set(info["files"]) == {f"{part}/{split}" for part in ("generic", "domains/legal")
                                for split in ("train", "validation", "test")}
  runner.unpack(str(carry), str(there))
  for domain in ("", "legal"):
    for split in ("train", "validation", "test"):
      assert (corpus_lib.read_docs(corpus_lib.split_path(str(there), split, domain))
              == corpus_lib.read_docs(corpus_lib.split_path(corpus_lib.TINY_ROOT, split, domain)))
  assert (there / "UNPACKED").exists()
  runner.unpack(str(carry), str(there))  # a second call (the next device call) is a no-op
