"""Documents: cleaning, deduplication, splitting, and the on-disk corpus layout.

A prepared corpus root (the bundled `assets/tiny`, or what `python -m pn_jax.data prepare` writes)
looks like

  <root>/manifest.json                         sources, versions, licenses, sizes, hashes
  <root>/generic/{train,validation,test}.array_record
  <root>/domains/<name>/{train,validation,test}.array_record

Each ArrayRecord record is one document, UTF-8 JSON `{"text": ..., "source": ...}`; grain reads
the files with `grain.sources.ArrayRecordDataSource`. The bundled tiny slice stores the same
records as JSON lines (`<split>.jsonl`): ArrayRecord files take at least 128 KiB each on disk. Every file is written to a temporary name and
moved into place with `os.replace`, so a crash never leaves a half-written split.
"""

from __future__ import annotations

import contextlib
import hashlib
import html
import html.parser
import json
import math
import os
import re
import tempfile
import unicodedata
from typing import Iterable, Iterator

from pn_jax import storage
from pn_jax.data.errors import DataError

SPLITS = ("train", "validation", "test")
ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
TINY_ROOT = os.path.join(ASSETS, "tiny")


# --- cleaning ----------------------------------------------------------------------------------

_CTRL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\u200b\ufeff]")
_TRAILING = re.compile(r"[ \t]+\n")
_BLANKS = re.compile(r"\n{3,}")


# Bytes no text file holds (C0 controls other than tab, newline, vertical tab, form feed, return,
# backspace and escape, which man pages and terminal text use; and DEL).
_BINARY_BYTES = frozenset(set(range(0x20)) - set(b"\t\n\x0b\x0c\r\x08\x1b") | {0x7f})
BINARY_FRACTION = 0.05  # more control bytes than this (or any NUL) in non-UTF-8 data: binary


def looks_binary(data: bytes) -> bool:
  """NUL bytes, or control bytes above BINARY_FRACTION: random or compiled data, UTF-16, an
  image, not text in some 8-bit encoding (whose controls are a few form feeds at most)."""
  if b"\x00" in data:
    return True
  return sum(data.count(bytes([b])) for b in _BINARY_BYTES) > BINARY_FRACTION * len(data)


def decode_bytes(data: bytes, name: str = "<bytes>") -> str:
  """UTF-8; stray invalid bytes in UTF-8 text are dropped, legacy (Latin-1) text is converted.
  Data that is not UTF-8 and looks binary (looks_binary) is a DataError naming `name`: decoded
  as Latin-1 it used to become documents of garbage."""
  try:
    return data.decode("utf-8")
  except UnicodeDecodeError as e:
    if looks_binary(data):
      raise DataError(f"{name} is not text: its bytes are not UTF-8 ({e.reason} at byte "
                      f"{e.start}) and hold NUL or control bytes (binary data, or UTF-16); "
                      "convert it to UTF-8 text, or remove it from the source (or narrow the "
                      "source's patterns)") from None
    text = data.decode("utf-8", errors="replace")
    bad = text.count("\ufffd")
    good = sum(1 for ch in text if ord(ch) > 127) - bad  # valid multi-byte characters
    if good < bad:  # mostly not UTF-8: a legacy single-byte encoding
      return data.decode("latin-1")
    return text.replace("\ufffd", "")


def clean_text(text: str) -> str:
  """NFC, no control chars, unix newlines, no trailing spaces, at most one blank line."""
  text = unicodedata.normalize("NFC", text.replace("\r\n", "\n").replace("\r", "\n"))
  text = _CTRL.sub("", text).replace("\u00a0", " ")
  text = _TRAILING.sub("\n", text + "\n")
  return _BLANKS.sub("\n\n", text).strip()


class _HTMLText(html.parser.HTMLParser):
  SKIP = {"script", "style", "head", "nav", "footer", "header", "noscript", "svg", "button"}
  BLOCK = {"p", "div", "br", "li", "ul", "ol", "tr", "table", "pre", "section", "article", "dt",
           "dd", "dl", "h1", "h2", "h3", "h4", "h5", "h6", "blockquote", "hr", "td", "th"}
  # navigation chrome of sphinx / docbook / texinfo / sqlite pages
  NAV = re.compile(r"\b(related|sphinxsidebar|footer|navheader|navfooter|nosearch|menu|"
                   r"breadcrumbs?|headerlink|toc|navigation|header|searchbox)\b")

  def __init__(self):
    super().__init__(convert_charrefs=True)
    self.out, self.skip, self.pre = [], 0, 0
    self.depth = {}  # tag -> open count, for tags that start a skipped navigation block
    self.nav = None  # (tag, depth) of the navigation block being skipped

  def handle_starttag(self, tag, attrs):
    if tag in ("div", "a", "span", "table", "p", "ul"):
      self.depth[tag] = self.depth.get(tag, 0) + 1
      attrs = dict(attrs)
      if self.nav is None and (self.NAV.search(attrs.get("class") or "") or
                               attrs.get("role") == "navigation"):
        self.nav = (tag, self.depth[tag])
    if tag in self.SKIP:
      self.skip += 1
    elif tag in self.BLOCK:
      self.out.append("\n")
    if tag == "pre":
      self.pre += 1

  def handle_endtag(self, tag):
    if tag in ("div", "a", "span", "table", "p", "ul"):
      if self.nav == (tag, self.depth.get(tag, 0)):
        self.nav = None
      self.depth[tag] = max(0, self.depth.get(tag, 0) - 1)
    if tag in self.SKIP:
      self.skip = max(0, self.skip - 1)
    elif tag in self.BLOCK:
      self.out.append("\n")
    if tag == "pre":
      self.pre = max(0, self.pre - 1)

  def handle_data(self, data):
    if self.skip or self.nav is not None:
      return
    if not self.pre:
      data = re.sub(r"\s+", " ", data)
      if not self.out or self.out[-1].endswith("\n"):
        data = data.lstrip()
    if data:
      self.out.append(data)


def html_to_text(markup: str) -> str:
  """Visible text of an HTML page: scripts, styles, navigation bars dropped; blocks on lines."""
  parser = _HTMLText()
  try:
    parser.feed(markup)
    parser.close()
  except Exception:  # malformed markup: fall back to stripping tags
    return clean_text(html.unescape(re.sub(r"<[^>]+>", " ", markup)))
  return clean_text("".join(parser.out))


def text_key(text: str) -> str:
  """Dedup key: case- and whitespace-insensitive hash."""
  return hashlib.sha1(" ".join(text.lower().split()).encode("utf-8")).hexdigest()


def dedup(docs: Iterable[dict], seen: set | None = None) -> Iterator[dict]:
  """Drops exact duplicates (after normalisation); `seen` is shared across corpora if given."""
  seen = set() if seen is None else seen
  for doc in docs:
    key = text_key(doc["text"])
    if key not in seen:
      seen.add(key)
      yield doc


def split_of(text: str, fractions=(0.98, 0.01, 0.01)) -> str:
  """Stable split by content hash: a document's split never changes when others are added."""
  u = int(hashlib.sha1(("split:" + text).encode("utf-8")).hexdigest()[:8], 16) / 2**32
  acc = 0.0
  for name, frac in zip(SPLITS, fractions):
    acc += frac
    if u < acc:
      return name
  return SPLITS[-1]


def chunk_text(text: str, max_chars: int) -> list[str]:
  """Splits very long documents at paragraph boundaries into pieces of at most ~max_chars."""
  if len(text) <= max_chars:
    return [text]
  pieces, cur, size = [], [], 0
  for para in text.split("\n\n"):
    if size + len(para) > max_chars and cur:
      pieces.append("\n\n".join(cur))
      cur, size = [], 0
    cur.append(para)
    size += len(para) + 2
  if cur:
    pieces.append("\n\n".join(cur))
  return pieces


# --- on-disk format ----------------------------------------------------------------------------

def _atomic_path(path: str) -> str:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)),
                             prefix="." + os.path.basename(path) + ".", suffix=".tmp")
  os.close(fd)
  return tmp


def strict_json(obj):
  """`obj` with every non-finite float (nan, inf: a skipped step's loss) as None, numpy scalars as
  Python numbers: what json.dumps(..., allow_nan=False) writes as strict JSON (its default
  writes a bare NaN, which JSON parsers other than Python's refuse)."""
  if isinstance(obj, dict):
    return {k: strict_json(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [strict_json(v) for v in obj]
  if hasattr(obj, "item") and getattr(obj, "shape", None) == ():  # a numpy scalar
    obj = obj.item()
  if isinstance(obj, float) and not math.isfinite(obj):
    return None
  return obj


def dumps(obj, **kwargs) -> str:
  """json.dumps as strict JSON (strict_json); numpy scalars are written as numbers."""
  return json.dumps(strict_json(obj), allow_nan=False, default=float, **kwargs)


def write_json(path: str, obj) -> None:
  """Atomically (temp file + rename), as strict JSON (`dumps`). A full disk is an OutOfSpace
  error, the temporary file removed and an earlier `path` kept."""
  text = dumps(obj, indent=1, sort_keys=True)
  tmp = _atomic_path(path)
  with storage.writing(path, needed=len(text.encode()), temp=tmp):
    with open(tmp, "w") as f:
      f.write(text)
    os.replace(tmp, path)


def write_docs(path: str, docs: Iterable[dict]) -> dict:
  """Writes documents atomically to ArrayRecord (or JSON lines if `path` ends in .jsonl).

  Returns {docs, bytes, sha256}; on any error the destination is left untouched (a full disk:
  OutOfSpace, the temporary file removed).
  """
  tmp = _atomic_path(path)
  jsonl = path.endswith(".jsonl")
  if jsonl:
    handle = open(tmp, "wb")
    write, close = (lambda rec: handle.write(rec + b"\n")), handle.close
  else:
    from array_record.python.array_record_module import ArrayRecordWriter
    writer = ArrayRecordWriter(tmp, "group_size:1")
    write, close = writer.write, writer.close
  n, size, digest = 0, 0, hashlib.sha256()
  try:
    for doc in docs:
      rec = json.dumps({"text": doc["text"], "source": doc.get("source", "")},
                       ensure_ascii=False).encode("utf-8")
      write(rec)
      digest.update(rec)
      n += 1
      size += len(doc["text"].encode("utf-8"))
    close()  # (ArrayRecord's writer raises a failed write here, as RuntimeError('... No space'))
  except BaseException as e:
    with contextlib.suppress(Exception):  # (a writer that failed may fail to close again)
      close()
    os.remove(tmp)
    if storage.is_out_of_space(e):
      raise storage.OutOfSpace(storage.message(path, storage.error_code(e),
                                               _record_bytes(docs))) from e
    raise
  os.replace(tmp, path)
  return {"docs": n, "bytes": size, "sha256": digest.hexdigest()}


def _record_bytes(docs) -> int | None:
  """The bytes write_docs' records of `docs` take (None for a one-pass iterator)."""
  if not isinstance(docs, (list, tuple)):
    return None
  return sum(len(json.dumps({"text": d["text"], "source": d.get("source", "")},
                            ensure_ascii=False).encode("utf-8")) + 1 for d in docs)


def _records(path: str) -> list[bytes]:
  if path.endswith(".jsonl"):
    with open(path, "rb") as f:
      return [line for line in f.read().split(b"\n") if line.strip()]
  import grain
  source = grain.sources.ArrayRecordDataSource([path])
  return [source[i] for i in range(len(source))]


def existing_split_file(path: str) -> str:
  """`x.array_record`, or its `x.jsonl` sibling when only that exists."""
  if not os.path.isfile(path) and path.endswith(".array_record"):
    alt = path[:-len(".array_record")] + ".jsonl"
    return alt if os.path.isfile(alt) else path
  return path


def read_docs(path: str) -> list[dict]:
  """All documents of one split file, as dicts; DataError if missing, corrupt or empty.

  `x.array_record` falls back to `x.jsonl` (the bundled tiny corpus is stored as JSON lines).
  """
  path = existing_split_file(path)
  if not os.path.isfile(path):
    raise DataError(f"corpus file {path!r} does not exist: run `python -m pn_jax.data prepare "
                    "--out=<data_dir>` or fix config.data.corpus / config.data.data_dir")
  if os.path.getsize(path) == 0:
    raise DataError(f"corpus file {path!r} is empty (0 bytes): delete it and rerun "
                    "`python -m pn_jax.data prepare`")
  try:
    records = _records(path)
  except Exception as e:
    raise DataError(f"corpus file {path!r} is not a readable ArrayRecord file ({e}); delete it "
                    "and rerun `python -m pn_jax.data prepare`") from e
  docs = []
  for i, rec in enumerate(records):
    try:
      doc = json.loads(decode_bytes(rec, path))
      doc["text"] = str(doc["text"])
    except (ValueError, KeyError, TypeError) as e:
      raise DataError(f"record {i} of {path!r} is not a JSON document with a 'text' field "
                      f"({e}); rebuild the corpus with `python -m pn_jax.data prepare`") from e
    docs.append(doc)
  return docs


def resolve_root(corpus: str, data_dir: str) -> str:
  """config.data.corpus -> the prepared corpus root directory."""
  if corpus == "tiny":
    return TINY_ROOT
  if corpus == "generic":
    return data_dir
  return corpus


def split_path(root: str, split: str, domain: str = "", ext: str = "array_record") -> str:
  if split not in SPLITS:
    raise DataError(f"unknown split {split!r}; choose one of {SPLITS}")
  if domain:
    return os.path.join(root, "domains", domain, f"{split}.{ext}")
  return os.path.join(root, "generic", f"{split}.{ext}")


def list_domains(root: str) -> list[str]:
  d = os.path.join(root, "domains")
  return sorted(os.listdir(d)) if os.path.isdir(d) else []


def check_domain(root: str, domain: str, key: str = "config.data.domain") -> None:
  """DataError for a domain that the corpus at `root` does not hold (a typo, not a missing
  `prepare`): the known domains and the closest one. A missing corpus is left to the readers,
  whose errors say how to prepare it."""
  domains = list_domains(root)
  if domain in domains or not os.path.isdir(root):
    return
  import difflib
  close = difflib.get_close_matches(domain, domains, n=1, cutoff=0.5)
  hint = f"; did you mean {close[0]!r}?" if close else ""
  raise DataError(f"{key}: unknown domain {domain!r}; corpus {root} has the domains "
                  f"{', '.join(domains) or '(none)'}{hint}")


def load_texts(root: str, split: str, domain: str = "") -> list[str]:
  """The non-empty document texts of one split; DataError naming the domain if there are none."""
  if domain:
    check_domain(root, domain)
  path = split_path(root, split, domain)
  texts = [d["text"] for d in read_docs(path) if d["text"].strip()]
  if not texts:
    what = f"domain {domain!r}" if domain else "the generic corpus"
    raise DataError(f"{what} has no text in split {split!r} ({path}); rebuild it with "
                    "`python -m pn_jax.data prepare` or choose another domain/split")
  return texts
