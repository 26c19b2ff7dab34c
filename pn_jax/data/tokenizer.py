"""Tokenizers: sentencepiece (trained once on the generic corpus, loaded everywhere) or bytes.

Both share one id layout for the special tokens: pad=0, unk=1 (sentencepiece only), bos=2, eos=3.
The byte tokenizer (`path="byte"`) maps byte b to id b + 3 with pad=0, bos=1, eos=2: 259 ids.
"""

from __future__ import annotations

import io
import os
import tempfile
from typing import Iterable, Sequence

import numpy as np

from pn_jax import storage
from pn_jax.data import DataError

BYTE = "byte"
BYTE_VOCAB = 259


class Tokenizer:
  """Text <-> ids. `encode` adds no bos/eos; the pipeline adds eos after each document."""

  def __init__(self, sp=None, *, path: str = BYTE):
    self._sp = sp
    self.path = path
    if sp is None:
      self.vocab_size, self.pad_id, self.bos_id, self.eos_id = BYTE_VOCAB, 0, 1, 2
    else:
      self.vocab_size = sp.get_piece_size()
      self.pad_id, self.bos_id, self.eos_id = sp.pad_id(), sp.bos_id(), sp.eos_id()

  @property
  def kind(self) -> str:
    return BYTE if self._sp is None else "sentencepiece"

  def encode(self, text: str) -> list[int]:
    if self._sp is None:
      return [b + 3 for b in text.encode("utf-8", errors="replace")]
    return self._sp.encode(text)

  def encode_batch(self, texts: Sequence[str], num_threads: int = -1) -> list[list[int]]:
    if self._sp is None:
      return [self.encode(t) for t in texts]
    return self._sp.encode(list(texts), num_threads=num_threads)

  def decode(self, ids) -> str:
    ids = [int(i) for i in np.asarray(ids).reshape(-1)]
    if self._sp is None:
      return bytes(i - 3 for i in ids if i >= 3).decode("utf-8", errors="replace")
    specials = (self.pad_id, self.bos_id, self.eos_id)
    return self._sp.decode([i for i in ids if i not in specials])

  def decode_continuation(self, prompt_ids, new_ids) -> str:
    """The text `new_ids` add after `prompt_ids`. Decoded alone, a sentencepiece sequence loses
    the space that starts its first word ("▁software" -> "software"), so the continuation is
    the decoded whole minus the decoded prompt."""
    head, whole = self.decode(prompt_ids), self.decode(list(prompt_ids) + list(new_ids))
    return whole[len(head):] if whole.startswith(head) else self.decode(new_ids)

  def decode_batch(self, seqs: Sequence[np.ndarray], num_threads: int = -1) -> list[str]:
    """[decode(s) for s in seqs], without a Python int per token: specials are dropped on one
    flat array and sentencepiece decodes the batch on its own threads."""
    if self._sp is None or not len(seqs):
      return [self.decode(s) for s in seqs]
    flat = np.concatenate([np.asarray(s).reshape(-1) for s in seqs])
    keep = (flat != self.pad_id) & (flat != self.bos_id) & (flat != self.eos_id)
    bounds = np.concatenate([[0], np.cumsum([np.size(s) for s in seqs])]).astype(np.int64)
    kept = np.concatenate([[0], np.cumsum(keep)])[bounds]  # kept ids before each boundary
    ids, ends = flat[keep].tolist(), kept.tolist()
    lists = [ids[a:b] for a, b in zip(ends[:-1], ends[1:])]
    return self._sp.decode(lists, num_threads=num_threads)

  def fingerprint(self) -> str:
    """A short hash of the model, to key caches built with this tokenizer."""
    import hashlib
    if self._sp is None:
      return BYTE
    return hashlib.sha1(self._sp.serialized_model_proto()).hexdigest()[:12]

  def __repr__(self):
    return f"Tokenizer({self.kind}, vocab_size={self.vocab_size}, path={self.path!r})"


def byte_tokenizer() -> Tokenizer:
  return Tokenizer(None)


def load_tokenizer(path: str) -> Tokenizer:
  """Loads a sentencepiece model file, or the byte tokenizer for `path == "byte"`."""
  if path == BYTE:
    return byte_tokenizer()
  import sentencepiece as spm
  if not path or not os.path.isfile(path):
    raise DataError(f"tokenizer {path!r} does not exist: set config.data.tokenizer_path to a "
                    "sentencepiece .model file, or leave it empty to train one on the corpus")
  sp = spm.SentencePieceProcessor()
  try:
    with open(path, "rb") as f:
      sp.load_from_serialized_proto(f.read())
  except Exception as e:  # sentencepiece raises RuntimeError/OSError on a bad proto
    raise DataError(f"tokenizer {path!r} is not a valid sentencepiece model ({e}); delete it "
                    "to retrain, or point config.data.tokenizer_path at a good one") from e
  if sp.get_piece_size() < 4 or min(sp.pad_id(), sp.bos_id(), sp.eos_id()) < 0:
    raise DataError(f"tokenizer {path!r} lacks pad/bos/eos ids; retrain it with "
                    "pn_jax.data.tokenizer.train_tokenizer")
  return Tokenizer(sp, path=path)


def _lines(texts: Iterable[str], max_chars: int) -> Iterable[str]:
  total = 0
  for text in texts:
    for line in text.split("\n"):
      line = line.strip()
      if line:
        yield line[:4000]
        total += len(line)
    if total >= max_chars:
      return


def character_coverage(lines: list[str], max_chars: int) -> float:
  """Character coverage keeping at most `max_chars` distinct characters as pieces (the rest go
  through byte fallback): sentencepiece fails when characters + byte pieces exceed the vocab.
  It also rejects coverage below 0.98 (a sample with many rare characters, e.g. some CJK lines in
  a small vocab, asks for less), so that is the floor."""
  import collections
  counts = collections.Counter()
  for line in lines:
    counts.update(line)
  freq = np.sort(np.fromiter(counts.values(), np.float64))[::-1]
  if len(freq) <= max_chars:
    return 0.9995
  return float(min(0.9995, max(0.98, freq[:max_chars].sum() / freq.sum() - 1e-6)))


def train_tokenizer(texts: Iterable[str], out_path: str, vocab_size: int, seed: int, *,
                    model_type: str = "unigram", max_chars: int = 30_000_000) -> Tokenizer:
  """Trains sentencepiece (byte fallback on, newline a piece) and writes it atomically."""
  import sentencepiece as spm
  if vocab_size < 300:
    raise DataError(f"sentencepiece vocab_size={vocab_size} is too small: byte fallback needs "
                    "256 byte pieces plus specials; use >= 300 or config.data.tokenizer='byte'")
  lines = list(_lines(texts, max_chars))
  if not lines:
    raise DataError(f"cannot train tokenizer {out_path!r}: the training texts are empty")
  spm.set_random_generator_seed(seed)
  coverage = character_coverage(lines, max(1, (vocab_size - 262) // 2))
  model = io.BytesIO()
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, vocab_size=vocab_size,
        model_type=model_type, byte_fallback=True, character_coverage=coverage,
        pad_id=0, unk_id=1, bos_id=2, eos_id=3, user_defined_symbols=["\n", "\t"],
        normalization_rule_name="identity", remove_extra_whitespaces=False,
        split_digits=True, hard_vocab_limit=False, num_threads=os.cpu_count() or 1,
        input_sentence_size=2_000_000, shuffle_input_sentence=True, minloglevel=2)
  except RuntimeError as e:
    raise DataError(f"sentencepiece training for {out_path!r} failed ({e}); a corpus this small "
                    f"may not support vocab_size={vocab_size}: lower config.model.vocab_size")
  os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(out_path)), suffix=".tmp")
  with storage.writing(out_path, needed=len(model.getvalue()), temp=tmp):
    with os.fdopen(fd, "wb") as f:
      f.write(model.getvalue())
    os.replace(tmp, out_path)
  return load_tokenizer(out_path)
