"""What a workdir's tokenizer and clusters were built from, recorded when built, checked on reuse.

A run's `<workdir>/tokenizer.model` (trained on the corpus when config.data.tokenizer_path is
empty) and `<workdir>/clusters/` are reused by every later start of the run. Without a record of
their inputs, a workdir first prepared on a wrong corpus (one that then failed validation) kept
that corpus's tokenizer when rerun on the right one: 51% more tokens for the same text, silently.

The corpus is identified by the content of its generic training split (`cache.content_id`, the
bytes the tokenizer and the clusters are fitted on; a moved or re-prepared corpus with the same
training text keeps its identity). The corpus root and its manifest.json hash are recorded too,
for a person reading the record; they are not compared (the manifest holds build timings).

Workdirs written before these records existed have none: their files are reused as before, with
a warning (nothing can say what they were built from). Nothing here deletes a file: a mismatch
is a DataError naming the files, what they were built from, what the config asks for, and how
to recover (a checkpoint trained with the tokenizer pins the corpus; without one the files can
be deleted and rebuilt).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys

from pn_jax.data.errors import DataError
from pn_jax.data import cache as cache_lib
from pn_jax.data.corpus import write_json

TOKENIZER_RECORD = "tokenizer.provenance.json"
FORMAT = 1


def corpus_identity(root: str, train_file: str) -> dict:
  """The corpus as the workdir's artefacts depend on it: `train` (compared) is the content id of
  the generic training split; `root` and `manifest` (sha256 of manifest.json) are informative."""
  manifest = os.path.join(root, "manifest.json")
  digest = ""
  if os.path.isfile(manifest):
    with open(manifest, "rb") as f:
      digest = hashlib.sha256(f.read()).hexdigest()[:32]
  return {"train": cache_lib.content_id(train_file), "root": os.path.abspath(root),
          "manifest": digest}


def tokenizer_inputs(config, corpus: dict) -> dict:
  """What a tokenizer trained by this config on this corpus is a function of."""
  return {"corpus": corpus, "vocab_size": int(config.model.vocab_size),
          "seed": int(config.seed),
          "sample_chars": int(config.data.get("tokenizer_sample_chars", 20_000_000))}


def write_tokenizer_record(workdir: str, inputs: dict, fingerprint: str) -> None:
  write_json(os.path.join(workdir, TOKENIZER_RECORD),
             {"format": FORMAT, **inputs, "fingerprint": fingerprint})


def _differences(recorded: dict, wanted: dict) -> list[str]:
  """`what: recorded -> wanted` for every compared input that differs."""
  out = []
  if recorded.get("corpus", {}).get("train") != wanted["corpus"]["train"]:
    out.append(f"corpus: {_corpus(recorded.get('corpus', {}))} -> {_corpus(wanted['corpus'])}")
  for key in ("vocab_size", "seed", "sample_chars"):
    if recorded.get(key) != wanted[key]:
      out.append(f"{key}: {recorded.get(key)} -> {wanted[key]}")
  return out


def _corpus(c: dict) -> str:
  return f"{c.get('root', '?')} (train split {c.get('train', '?')})"


def _warn(message: str) -> None:
  print(f"pn_jax.data: warning: {message}", file=sys.stderr)


def has_checkpoint(workdir: str) -> bool:
  """A committed checkpoint step in the workdir (orbax names them by step number)."""
  d = os.path.join(workdir, "checkpoints")
  return os.path.isdir(d) and any(name.isdigit() for name in os.listdir(d))


def recovery(workdir: str, files: list[str]) -> str:
  """How to get out of a mismatch: never by deleting what a checkpoint was trained with."""
  if has_checkpoint(workdir):
    return (f"the checkpoints in {os.path.join(workdir, 'checkpoints')} were trained with them: "
            "point the config back at the corpus and settings they were built from, or use a "
            "fresh --workdir")
  return ("use a fresh --workdir, or (no checkpoint depends on them yet) delete "
          f"{' and '.join(os.path.join(workdir, f) for f in files)} to rebuild them from this "
          "corpus")


# Everything built from the tokenizer in a workdir: deleting one means rebuilding all.
TOKENIZER_FILES = ("tokenizer.model", TOKENIZER_RECORD, "clusters")


def check_tokenizer(workdir: str, inputs: dict, fingerprint: str) -> None:
  """Refuses `<workdir>/tokenizer.model` if its record says it was trained from other inputs
  (or the record describes another model file); warns if it has no record (an older workdir)."""
  path = os.path.join(workdir, TOKENIZER_RECORD)
  model = os.path.join(workdir, "tokenizer.model")
  if not os.path.exists(path):
    _warn(f"{model} has no provenance record ({TOKENIZER_RECORD}, written since this check "
          "exists): reused without knowing which corpus it was trained on")
    return
  try:
    with open(path) as f:
      recorded = json.load(f)
  except (OSError, ValueError) as e:
    raise DataError(f"{path} is unreadable ({e}); "
                    f"{recovery(workdir, list(TOKENIZER_FILES))}") from e
  problems = _differences(recorded, inputs)
  if recorded.get("fingerprint") != fingerprint:
    problems.append(f"model file: fingerprint {recorded.get('fingerprint')} -> {fingerprint} "
                    "(tokenizer.model was replaced after it was recorded)")
  if problems:
    raise DataError(f"{model} was trained from other inputs than this config asks for ("
                    f"{'; '.join(problems)}); {recovery(workdir, list(TOKENIZER_FILES))}")


def check_clusters(cdir: str, workdir: str, recorded: dict | None, corpus: dict) -> None:
  """Refuses clusters fitted on another corpus; warns for clusters without a record."""
  if recorded is None:
    _warn(f"{cdir}/meta.json has no corpus record (written before it was recorded): its "
          "clusters are reused without knowing which corpus they were fitted on")
    return
  if recorded.get("train") != corpus["train"]:
    raise DataError(f"{cdir} was fitted on another corpus than this config asks for (corpus: "
                    f"{_corpus(recorded)} -> {_corpus(corpus)}); "
                    f"{recovery(workdir, ['clusters'])}")
