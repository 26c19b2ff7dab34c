"""Bad inputs fail early with a DataError naming the file/domain and the fix; nothing half-written."""

import os

import pytest

from conftest import eval_batches, train_batches
from pn_jax.config import base_config
from pn_jax.data import DataError
from pn_jax.data import corpus as corpus_lib
from pn_jax.data import batches
from pn_jax.data import pipeline

WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho "
         "sigma tau upsilon phi chi psi omega").split()


def make_root(root, n_docs=40, domain_docs=None):
  docs = [{"text": " ".join(WORDS[(i + j) % len(WORDS)] for j in range(60 + i))}
          for i in range(n_docs)]
  for split in corpus_lib.SPLITS:
    corpus_lib.write_docs(corpus_lib.split_path(str(root), split), docs)
    if domain_docs is not None:
      corpus_lib.write_docs(corpus_lib.split_path(str(root), split, "empty_domain"), domain_docs)
  return str(root)


def config_for(root, **data):
  c = base_config()
  c.model.vocab_size = 259
  c.model.k = 2
  c.data.corpus = str(root)
  c.data.tokenizer = "byte"
  c.data.seq_len = 32
  c.data.batch_size = 4
  for key, value in data.items():
    c.data[key] = value
  return c


def test_missing_corpus(tmp_path):
  with pytest.raises(DataError, match="does not exist.*pn_jax.data prepare"):
    pipeline.prepare_run_data(config_for(tmp_path / "nowhere"), str(tmp_path / "w"))


def test_empty_file(tmp_path):
  root = make_root(tmp_path / "c")
  open(corpus_lib.split_path(root, "train"), "wb").close()
  with pytest.raises(DataError, match=r"train\.array_record.*empty"):
    pipeline.prepare_run_data(config_for(root), str(tmp_path / "w"))


def test_corrupt_file(tmp_path):
  root = make_root(tmp_path / "c")
  with open(corpus_lib.split_path(root, "train"), "wb") as f:
    f.write(b"this is not an array record file" * 10)
  with pytest.raises(DataError, match="not a readable ArrayRecord"):
    corpus_lib.read_docs(corpus_lib.split_path(root, "train"))


def test_non_utf8_bytes(tmp_path):
  from array_record.python.array_record_module import ArrayRecordWriter
  path = str(tmp_path / "latin.array_record")
  w = ArrayRecordWriter(path, "group_size:1")
  w.write('{"text": "caf\xe9 cr\xe8me br\xfbl\xe9e"}'.encode("latin-1"))
  w.write(b'{"text": "ok \xff\xfe stray bytes in utf-8 text that is otherwise fine and long"}')
  w.write(b"\x80\x81 not json")
  w.close()
  with pytest.raises(DataError, match="record 2 of .*latin.array_record.*not a JSON document"):
    corpus_lib.read_docs(path)
  w = ArrayRecordWriter(path, "group_size:1")  # without the broken record: decoded, not dropped
  w.write('{"text": "caf\xe9 cr\xe8me br\xfbl\xe9e"}'.encode("latin-1"))
  w.write(b'{"text": "ok \xff stray byte in utf-8 text \xc3\xbc"}')
  w.close()
  assert [d["text"] for d in corpus_lib.read_docs(path)] == [
      "café crème brûlée", "ok  stray byte in utf-8 text ü"]
  assert corpus_lib.decode_bytes("café".encode("latin-1")) == "café"
  assert corpus_lib.decode_bytes(b"ok \xff and " + "ü".encode() * 50).startswith("ok  and ü")


def test_missing_tokenizer(tmp_path):
  root = make_root(tmp_path / "c")
  config = config_for(root, tokenizer="sentencepiece", tokenizer_path=str(tmp_path / "x.model"))
  config.model.vocab_size = 512
  with pytest.raises(DataError, match=r"x\.model.*does not exist.*tokenizer_path"):
    pipeline.prepare_run_data(config, str(tmp_path / "w"))


def test_tokenizer_bigger_than_model_vocab(tmp_path):
  root = make_root(tmp_path / "c")
  config = config_for(root)
  config.model.vocab_size = 100
  with pytest.raises(DataError, match="vocab_size"):
    pipeline.prepare_run_data(config, str(tmp_path / "w"))


def test_corpus_smaller_than_one_batch(tmp_path):
  root = make_root(tmp_path / "c", n_docs=3)
  config = config_for(root, batch_size=64)
  rd = pipeline.prepare_run_data(config, str(tmp_path / "w"), progress=False)
  with pytest.raises(DataError, match="fewer than one global batch of 64"):
    train_batches(config, rd)


def test_batch_not_divisible_by_processes(tmp_path):
  root = make_root(tmp_path / "c")
  config = config_for(root, batch_size=6)
  rd = pipeline.prepare_run_data(config, str(tmp_path / "w"), progress=False)
  with pytest.raises(DataError, match="not divisible by process_count=4"):
    train_batches(config, rd, process_index=0, process_count=4)


def test_domain_without_text(tmp_path):
  root = make_root(tmp_path / "c", domain_docs=[{"text": ""}, {"text": "   \n"}])
  config = config_for(root)
  rd = pipeline.prepare_run_data(config, str(tmp_path / "w"), progress=False)
  with pytest.raises(DataError, match="domain 'empty_domain' has no text"):
    batches.domain_batches(rd, "empty_domain", "train",
                           batch_size=config.data.batch_size, seed=config.seed)
  with pytest.raises(DataError, match="unknown domain 'nope'; .*has the domains empty_domain"):
    batches.domain_batches(rd, "nope", "train",
                           batch_size=config.data.batch_size, seed=config.seed)
  config.data.domain = "empty_domain"
  with pytest.raises(DataError, match="empty_domain"):
    eval_batches(config, rd)


def test_follower_times_out_clearly(tmp_path):
  root = make_root(tmp_path / "c")
  with pytest.raises(DataError, match="process 1 waited"):
    pipeline.prepare_run_data(config_for(root), str(tmp_path / "w"), process_index=1,
                              wait_timeout_s=0.1)


def test_clusters_of_another_config_are_refused(tmp_path):
  root = make_root(tmp_path / "c")
  pipeline.prepare_run_data(config_for(root), str(tmp_path / "w"), progress=False)
  config = config_for(root)
  config.model.k = 3
  with pytest.raises(DataError, match="fresh --workdir"):
    pipeline.prepare_run_data(config, str(tmp_path / "w"), progress=False)


def test_failed_write_leaves_nothing(tmp_path):
  path = str(tmp_path / "out" / "train.array_record")

  def docs():
    yield {"text": "fine"}
    raise RuntimeError("boom")

  with pytest.raises(RuntimeError):
    corpus_lib.write_docs(path, docs())
  assert os.listdir(tmp_path / "out") == []


def test_binary_file_in_a_text_source_is_refused_naming_it(tmp_path):
  """Issue 25, item 8: random bytes in a `text` source were decoded as Latin-1 and became corpus
  documents. Binary (NUL or control bytes, not UTF-8) is a DataError naming the file; legacy
  8-bit text is still converted, and nothing is written."""
  import numpy as np
  from pn_jax.data import prepare as prepare_lib
  from pn_jax.data import sources as sources_lib
  texts = tmp_path / "texts"
  texts.mkdir()
  for i in range(300):
    (texts / f"doc{i}.txt").write_text(f"Document {i} about kernels and databases. " * 10)
  (texts / "legacy.txt").write_bytes("Le caf\xe9 est tr\xe8s bon. ".encode("latin-1") * 20)
  blob = texts / "blob.txt"
  blob.write_bytes(np.random.default_rng(0).bytes(4096))
  source = sources_lib.Source("mine", str(texts), "dir", "generic", "mine", "text", ("*.txt",))
  out = tmp_path / "out"
  with pytest.raises(DataError, match=rf"^{blob} is not text: its bytes are not UTF-8 .*binary "
                                      r"data, or UTF-16.*remove it from the source"):
    prepare_lib.prepare(str(out), sources=[source], progress=False)
  assert not out.exists()
  blob.unlink()  # the only problem: without it the source prepares, its Latin-1 file converted
  prepare_lib.prepare(str(out), sources=[source], progress=False)
  assert any("Le café est très bon." in t for s in corpus_lib.SPLITS
             for t in corpus_lib.load_texts(str(out), s))
  with pytest.raises(DataError, match=r"^u16\.txt is not text"):
    corpus_lib.decode_bytes("UTF-16 text".encode("utf-16"), "u16.txt")
  assert corpus_lib.decode_bytes("caf\xe9\f".encode("latin-1")) == "caf\xe9\f"


@pytest.mark.parametrize("manifest", ["{}", "[]", '{"corpora": 5}',
                                      '{"corpora": {"generic": {"splits": {"train": {}}}}}'])
def test_stats_on_a_malformed_manifest_names_it(tmp_path, manifest):
  """Issue 25, item 8: valid JSON without the manifest's structure was a KeyError traceback."""
  from pn_jax.data.__main__ import main
  (tmp_path / "manifest.json").write_text(manifest)
  with pytest.raises(DataError, match=rf"^{tmp_path}/manifest.json is not a corpus manifest: "
                                      r"expected .*rerun `python -m pn_jax.data prepare"):
    main(["stats", f"--out={tmp_path}"])
