"""Runs the comparison experiment on a lent GPU machine that can reach nothing: what travels and
how it is unpacked there.

Here (a machine with the prepared corpus and PyPI):

    python launch/gpu_experiment.py pack --corpus=data_cache --out=runs/device_carry

writes `runs/device_carry/` (git-ignored, at most ~64 MiB): every split of the generic corpus
and of the experiment's domains as JSON lines + xz (137 MB of generic text is ~32 MB), and the
wheels the device image lacks (grain, array_record, ml_collections, portpicker, tensorboardX,
for CPython 3.12 x86-64). There, each call runs `bash launch/gpu_experiment.sh CONFIG`, which
installs the wheels, unpacks the corpus once per machine (`unpack` below, stdlib only), and runs
`python -m pn_jax.experiment` for at most `CALL_SECONDS` before stopping at a resumable point
(exit 143: call again, back to back, on the same machine; exit 0: done).
"""

from __future__ import annotations

import argparse
import json
import lzma
import os
import subprocess
import sys

SPLITS = ("train", "validation", "test")
# What the device image lacks (its python3 has jax, flax, optax, orbax, sentencepiece, sklearn...)
WHEELS = ("grain==0.2.18", "array_record==0.8.6", "ml_collections==1.1.0", "portpicker==1.6.0",
          "tensorboardX==2.6.5")
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64", "any")
LIMIT_BYTES = 64 * 2**20


def _parts(domains: list[str]) -> list[tuple[str, str]]:
  """(relative dir, domain) for the generic set and each domain."""
  return [("generic", "")] + [(os.path.join("domains", d), d) for d in domains]


def pack(corpus: str, out: str, domains: list[str], wheels: tuple[str, ...] = WHEELS,
         python_version: str = "3.12") -> dict:
  """Compresses the corpus splits and downloads `wheels` into `out`; returns sizes. Idempotent:
  files already there are kept."""
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from pn_jax.data import corpus as corpus_lib
  sizes = {}
  for rel, domain in _parts(domains):
    for split in SPLITS:
      dst = os.path.join(out, "corpus", rel, f"{split}.jsonl.xz")
      if not os.path.exists(dst):
        docs = corpus_lib.read_docs(corpus_lib.split_path(corpus, split, domain))
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        with lzma.open(dst + ".tmp", "wt", encoding="utf-8", preset=6) as f:
          for doc in docs:
            f.write(json.dumps({"text": doc["text"], "source": doc.get("source", "")},
                               ensure_ascii=False) + "\n")
        os.replace(dst + ".tmp", dst)
      sizes[os.path.join(rel, split)] = os.path.getsize(dst)
  wheel_dir = os.path.join(out, "wheels")
  os.makedirs(wheel_dir, exist_ok=True)
  for spec in wheels:
    name = spec.split("==")[0].lower().replace("-", "_")
    if any(f.lower().startswith(name) for f in os.listdir(wheel_dir)):
      continue
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
           "--python-version", python_version, "--implementation", "cp", "-d", wheel_dir, spec]
    for p in PLATFORMS:
      cmd += ["--platform", p]
    subprocess.run(cmd, check=True)
  for f in os.listdir(wheel_dir):
    sizes[os.path.join("wheels", f)] = os.path.getsize(os.path.join(wheel_dir, f))
  total = sum(sizes.values())
  if total > LIMIT_BYTES:
    raise SystemExit(f"{out} holds {total / 2**20:.1f} MiB, over the device's {LIMIT_BYTES >> 20} "
                     "MiB transfer limit: pack fewer domains")
  return {"total_mib": round(total / 2**20, 2), "files": sizes}


def unpack(carry: str, to: str) -> None:
  """Decompresses every `<carry>/corpus/**/<split>.jsonl.xz` into `<to>/**/<split>.jsonl` (the
  corpus layout pn_jax.data.corpus reads), once: a finished unpack leaves `<to>/UNPACKED`."""
  done = os.path.join(to, "UNPACKED")
  if os.path.exists(done):
    return
  src = os.path.join(carry, "corpus")
  for dirpath, _, files in os.walk(src):
    for name in files:
      if not name.endswith(".jsonl.xz"):
        continue
      dst = os.path.join(to, os.path.relpath(dirpath, src), name[:-len(".xz")])
      os.makedirs(os.path.dirname(dst), exist_ok=True)
      with lzma.open(os.path.join(dirpath, name), "rb") as f, open(dst + ".tmp", "wb") as g:
        while block := f.read(1 << 24):
          g.write(block)
      os.replace(dst + ".tmp", dst)
  with open(done, "w") as f:
    f.write("ok\n")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  sub = parser.add_subparsers(dest="cmd", required=True)
  p = sub.add_parser("pack", help="compress the corpus and fetch the wheels (here)")
  p.add_argument("--corpus", default="data_cache", help="prepared corpus root")
  p.add_argument("--out", default="runs/device_carry")
  p.add_argument("--domains", default="legal,religious,manpages,dictionary,source_code")
  u = sub.add_parser("unpack", help="decompress the corpus (on the device)")
  u.add_argument("--carry", default="runs/device_carry")
  u.add_argument("--to", default="/tmp/pn_corpus")
  args = parser.parse_args()
  if args.cmd == "pack":
    info = pack(args.corpus, args.out, [d for d in args.domains.split(",") if d])
    print(json.dumps(info["total_mib"]), "MiB in", args.out)
  else:
    unpack(args.carry, args.to)


if __name__ == "__main__":
  main()
