"""Tokenizers: sentencepiece trains on the tiny corpus in seconds, round-trips, loads clearly."""

import os

import pytest

from pn_jax.data import DataError
from pn_jax.data import corpus as corpus_lib
from pn_jax.data import tokenizer as tok_lib


@pytest.fixture(scope="module")
def sp(tmp_path_factory):
  texts = corpus_lib.load_texts(corpus_lib.TINY_ROOT, "train")
  path = str(tmp_path_factory.mktemp("tok") / "tok.model")
  return tok_lib.train_tokenizer(texts, path, vocab_size=512, seed=0), path


def test_sentencepiece_roundtrip_and_specials(sp):
  tok, path = sp
  assert tok.vocab_size <= 512 and tok.kind == "sentencepiece"
  assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 2, 3)
  text = "def f(x):\n\treturn x + 1  # naïve — ünïcode ✓ 漢字\n\nNew paragraph."
  ids = tok.encode(text)
  assert tok.decode(ids) == text  # identity normalisation + byte fallback: lossless
  assert tok.decode([tok.bos_id] + ids + [tok.eos_id, tok.pad_id]) == text
  assert tok.encode_batch([text, "a"]) == [ids, tok.encode("a")]
  assert len(ids) < len(text.encode())  # it actually merges pieces
  again = tok_lib.load_tokenizer(path)
  assert again.encode(text) == ids and again.fingerprint() == tok.fingerprint()


def test_decode_continuation_keeps_the_space_before_a_new_word(sp):
  """Generated tokens shown after their prompt (the sample mode): decoding them alone drops the
  space of their first word's "▁" piece; the continuation keeps it."""
  tok, _ = sp
  prompt, rest = "The license", " software is free."
  ids = tok.encode(prompt + rest)
  head = tok.encode(prompt)
  assert ids[:len(head)] == head  # the prompt's pieces start the whole text's
  new = ids[len(head):]
  assert tok.decode(new) == rest.lstrip()  # what sample printed: "The licensesoftware..."
  assert prompt + tok.decode_continuation([tok.bos_id] + head, new) == prompt + rest
  byte = tok_lib.byte_tokenizer()
  assert byte.decode_continuation(byte.encode("ab"), byte.encode(" c")) == " c"


def test_training_is_deterministic(tmp_path):
  texts = corpus_lib.load_texts(corpus_lib.TINY_ROOT, "train")[:80]
  a = tok_lib.train_tokenizer(texts, str(tmp_path / "a.model"), vocab_size=400, seed=0)
  b = tok_lib.train_tokenizer(texts, str(tmp_path / "b.model"), vocab_size=400, seed=0)
  assert (tmp_path / "a.model").read_bytes() == (tmp_path / "b.model").read_bytes()
  assert a.fingerprint() == b.fingerprint() and a.encode("determinism") == b.encode(
      "determinism")


def test_coverage_stays_in_sentencepiece_range():
  rare = "".join(chr(0x4e00 + i) for i in range(300))  # 300 distinct CJK characters, once each
  coverage = tok_lib.character_coverage
  assert coverage(["abc" * 100, rare], max_chars=3) == 0.98  # would be 0.5
  assert coverage(["abc" * 100], max_chars=69) == 0.9995


def test_byte_tokenizer():
  tok = tok_lib.load_tokenizer("byte")
  assert tok.vocab_size == 259 and tok.kind == "byte"
  text = "héllo\nworld"
  ids = tok.encode(text)
  assert len(ids) == len(text.encode()) and min(ids) >= 3 and max(ids) < 259
  assert tok.decode(ids + [tok.eos_id]) == text


def test_missing_and_corrupt_tokenizer(tmp_path):
  with pytest.raises(DataError, match="does not exist"):
    tok_lib.load_tokenizer(str(tmp_path / "nope.model"))
  bad = tmp_path / "bad.model"
  bad.write_bytes(b"\x00\x01 definitely not a model")
  with pytest.raises(DataError, match="not a valid sentencepiece model"):
    tok_lib.load_tokenizer(str(bad))
  assert issubclass(DataError, ValueError)


def test_train_on_empty_texts_fails_cleanly(tmp_path):
  out = tmp_path / "t.model"
  with pytest.raises(DataError, match="empty"):
    tok_lib.train_tokenizer(["", "  \n "], str(out), vocab_size=512, seed=0)
  with pytest.raises(DataError, match="too small"):
    tok_lib.train_tokenizer(["text"], str(out), vocab_size=100, seed=0)
  assert not out.exists() and not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
