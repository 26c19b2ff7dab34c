"""Cleaning, extraction, dedup, splits and the `prepare` command on local sources (no network)."""

import dataclasses
import gzip
import io
import json
import os
import shutil
import subprocess
import tarfile

import pytest

from pn_jax.data import DataError
from pn_jax.data import corpus as corpus_lib
from pn_jax.data import prepare as prepare_lib
from pn_jax.data import sources as sources_lib
from pn_jax.data.__main__ import main as cli_main


def test_html_to_text_drops_chrome():
  page = """<html><head><title>T</title><style>p {color: red}</style></head><body>
  <div class="related" role="navigation"><a href="x">next</a> | <a>previous</a></div>
  <script>var x = 1;</script>
  <h1>Heading&para;</h1><p>First   paragraph with &amp; entity.</p>
  <pre>code  keeps
    its layout</pre><div class="footer">Copyright nobody</div></body></html>"""
  text = corpus_lib.html_to_text(page)
  assert "First paragraph with & entity." in text
  assert "code  keeps\n    its layout" in text
  for junk in ("next", "previous", "var x", "color", "Copyright"):
    assert junk not in text


def test_roff_and_pod_and_clean():
  man = '.\\" comment\n.TH LS 1\n.SH NAME\nls \\- list directory contents\n.SH DESCRIPTION\n' \
        '.B ls\nlists \\fIfiles\\fR.\n.PP\nMore text.\n'
  text = sources_lib.roff_to_text(man)
  assert "NAME" in text and "ls - list directory contents" in text and "files" in text
  assert "\\f" not in text and "comment" not in text
  pod = "=head1 NAME\n\nperlfoo - B<bold> and C<< code() >>\n\n=cut\n"
  assert "perlfoo - bold and code()" in sources_lib.pod_to_text(pod)
  assert corpus_lib.clean_text("a \r\n\r\n\r\n\r\nb\x00c  \n") == "a\n\nbc"


def test_dedup_split_chunk():
  docs = [{"text": "Hello  World"}, {"text": "hello world"}, {"text": "other"}]
  assert [d["text"] for d in corpus_lib.dedup(docs)] == ["Hello  World", "other"]
  assert corpus_lib.split_of("some text") == corpus_lib.split_of("some text")
  splits = [corpus_lib.split_of(f"doc {i}", (0.8, 0.1, 0.1)) for i in range(2000)]
  assert 0.75 < splits.count("train") / 2000 < 0.85 and splits.count("test") > 100
  long = "\n\n".join(f"paragraph {i} " * 20 for i in range(100))
  pieces = corpus_lib.chunk_text(long, 2000)
  assert all(len(p) <= 2000 for p in pieces) and "\n\n".join(pieces) == long


def _b64(n):
  chars = sources_lib.DICTD_B64
  out = ""
  while True:
    out = chars[n % 64] + out
    n //= 64
    if not n:
      return out


def test_dictd_extraction(tmp_path):
  entries = [f"word{i}\n  definition number {i} " + "x" * 30 for i in range(100)]
  data, index, offset = b"", [], 0
  for i, e in enumerate(entries):
    raw = e.encode()
    index.append(f"word{i}\t{_b64(offset)}\t{_b64(len(raw))}")
    data += raw
    offset += len(raw)
  d = tmp_path / "usr/share/dictd"
  d.mkdir(parents=True)
  (d / "test.dict.dz").write_bytes(gzip.compress(data))
  (d / "test.index").write_text("\n".join(index))
  docs = list(sources_lib.extract_dictd(str(tmp_path), ("usr/share/dictd/*.dict.dz",)))
  text = "\n\n".join(t for _, t in docs)
  assert len(docs) == 3 and all(f"definition number {i} " in text for i in range(100))


def test_prose_extractors(tmp_path):
  wiki = {"Long": {"title": "Long", "extract": "A long lead section. " * 15},
          "A": {"title": "A", "extract": "Tiny one."},
          "B": {"title": "B", "extract": "Tiny two. " * 19},
          "Empty": {"title": "Empty", "extract": ""}}
  recipes = {"Cookbook:Tea": {"title": "Tea", "category": "Drinks", "servings": "2", "time": None,
                              "ingredients": ["2 cups water", "1 tea bag"],
                              "steps": ["Boil the water.", "Steep the tea for 3 minutes."] * 4}}
  (tmp_path / "wiki.json").write_text(json.dumps(wiki))
  (tmp_path / "recipes.json").write_text(json.dumps(recipes))
  docs = list(sources_lib.extract_wiki_summaries(str(tmp_path), ("wiki.json",)))
  assert [n.split("#")[0] for n, _ in docs] == ["wiki.json:Long", "wiki.json:A+"]
  assert docs[0][1].startswith("Long\n\nA long lead")
  assert docs[1][1].startswith("A\n\nTiny one.\n\nB\n\nTiny two.")
  (_, text), = sources_lib.extract_recipes(str(tmp_path), ("recipes.json",))
  assert text.startswith("Tea\n\nCategory: Drinks. Servings: 2.\n\nIngredients:\n- 2 cups water\n")
  assert "\n1. Boil the water.\n2. Steep the tea" in text and "Time" not in text
  brown = ("\n\n\tJury/nn-hl says/vbz-hl \n"
           "The/at jury/nn said/vbd ,/, ``/`` it/pps is/bez fine/jj ''/'' ./.\n"
           "Costs/nns were/bed $/$ 5/cd (/( or/cc less/ap )/) ;/. ;/.\n"
           "it/pps was/bedz '/' pro/jj '/' ./.\n``/`` Why/wrb ''/'' ?/. ?/.\n"
           "``/`` Me/ppo ?/. ?/. ''/'' ,/, she/pps said/vbd ./.\n\n\n\tNext/ap paragraph/nn ./.\n"
           ) * 3
  (tmp_path / "ca01").write_text(brown)
  (_, text), = sources_lib.extract_brown(str(tmp_path), ("c[a-r][0-9][0-9]",))
  assert text.startswith('Jury says\nThe jury said, "it is fine." Costs were $5 (or less); it was '
                         '\'pro\'. "Why?" "Me?", she said.\n\nNext paragraph.\n\nJury says\n')
  assert "/" not in text
  book = tmp_path / "html" / "book"
  (book / "hello").mkdir(parents=True)
  (book / "book.js").write_text("")
  page = "<html><body><main><p>{} " + "words " * 50 + "</p></main></body></html>"
  for rel, what in [("ch01.html", "chapter"), ("print.html", "whole book"),
                    ("hello/print.html", "printing chapter")]:
    (book / rel).write_text(page.format(what))
  docs = dict(sources_lib.extract_mdbook(str(tmp_path), ("html/book/**/*.html",)))
  assert sorted(docs) == ["html/book/ch01.html#0", "html/book/hello/print.html#0"]


def test_npm_fetch_offline(tmp_path, monkeypatch):
  src = sources_lib.Source("t", "corpus-t", "npm", "generic", "MIT", "text", ("package/*.txt",),
                           version="1.0.0")
  monkeypatch.setenv("PATH", str(tmp_path))  # no npm on PATH
  with pytest.raises(DataError, match="`npm` is not installed"):
    sources_lib.fetch(src, str(tmp_path / "cache"))
  with pytest.raises(DataError, match="npm sources need a pinned version"):
    sources_lib.fetch(dataclasses.replace(src, version=""), str(tmp_path / "cache"))
  buf = io.BytesIO()
  with tarfile.open(fileobj=buf, mode="w:gz") as t:  # an already-downloaded `npm pack` tarball
    data = b"x" * 300
    info = tarfile.TarInfo("package/a.txt")
    info.size = len(data)
    t.addfile(info, io.BytesIO(data))
  (tmp_path / "cache" / "packages" / "corpus-t-1.0.0.tgz").write_bytes(buf.getvalue())
  root, version, archive = sources_lib.fetch(src, str(tmp_path / "cache"))
  assert version == "1.0.0" and archive.endswith("corpus-t-1.0.0.tgz")
  assert [d["text"] for d in sources_lib.extract(src, root)] == ["x" * 300]
  assert not [p for p in os.listdir(os.path.dirname(root)) if p.endswith(".tmp")]


def _write_deb(pkg_dir, name: str, files: dict[str, bytes]) -> None:
  """A real .deb (dpkg-deb --build) in `pkg_dir`, as `apt-get download` leaves it there."""
  root = pkg_dir / f"{name}-build"
  (root / "DEBIAN").mkdir(parents=True)
  (root / "DEBIAN" / "control").write_text(
      f"Package: {name}\nVersion: 1.0-1\nArchitecture: all\nMaintainer: t <t@t>\n"
      "Description: test\n")
  for rel, data in files.items():
    (root / rel).parent.mkdir(parents=True, exist_ok=True)
    (root / rel).write_bytes(data)
  subprocess.run(["dpkg-deb", "--build", str(root), str(pkg_dir / f"{name}_1.0-1_all.deb")],
                 check=True, capture_output=True)


@pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="needs dpkg-deb")
def test_debian_fetch_with_relative_cache_and_leftover_tmp(tmp_path, monkeypatch):
  """`prepare --out=data_cache` (relative, from the repo root): dpkg-deb runs inside the
  packages folder, so the paths it gets must be absolute; a rerun after an interrupted unpack
  (its .tmp folder left behind) unpacks again instead of failing with FileExistsError."""
  src = sources_lib.Source("t", "corpus-t", "debian", "generic", "MIT", "text",
                           ("usr/share/doc/t/*.txt",))
  monkeypatch.chdir(tmp_path)
  (tmp_path / "data_cache" / "packages").mkdir(parents=True)
  _write_deb(tmp_path / "data_cache" / "packages", "corpus-t",
             {"usr/share/doc/t/a.txt": b"y" * 300})
  leftover = tmp_path / "data_cache" / "unpacked" / "corpus-t.tmp"
  leftover.mkdir(parents=True)
  (leftover / "half-written").write_text("from a killed run")
  root, version, archive = sources_lib.fetch(src, "data_cache")
  assert version == "1.0-1" and os.path.isabs(root) and os.path.isfile(archive)
  assert [d["text"] for d in sources_lib.extract(src, root)] == ["y" * 300]
  assert not leftover.exists()
  assert sources_lib.fetch(src, "data_cache")[0] == root  # the rerun reuses the unpacked tree


def _local_sources(tmp_path):
  def tree(name, texts, ext="txt"):
    root = tmp_path / "pkgs" / name
    root.mkdir(parents=True)
    for i, t in enumerate(texts):
      (root / f"f{i}.{ext}").write_bytes(t)
    return str(root)

  generic = [f"Generic document {i} about databases and kernels. ".encode() * 12
             for i in range(120)]
  generic.append("Le caf\xe9 est tr\xe8s bon. ".encode("latin-1") * 20)  # legacy encoding
  generic.append(b"")  # empty file: skipped
  dup = b"A shared paragraph that appears in both the domain and the generic source. " * 5
  generic.append(dup)
  domain = [f"And it came to pass in the year {i} that the people rejoiced. ".encode() * 10
            for i in range(60)] + [dup]
  S = sources_lib.Source
  return [S("gen", tree("gen", generic), "dir", "generic", "test-license", "text", ("*.txt",)),
          S("dom", tree("dom", domain), "dir", "verses", "public-domain", "text", ("*.txt",))]


def test_prepare_end_to_end(tmp_path, capsys):
  sources = _local_sources(tmp_path)
  out = str(tmp_path / "out")
  m = prepare_lib.prepare(out, sources=sources, progress=False, tiny_out=str(tmp_path / "tiny"))
  gen = next(s for s in m["sources"] if s["name"] == "gen")
  assert gen["overlap_removed"] == 1 and gen["documents_kept"] == 121  # dup went to the domain
  assert gen["license"] == "test-license" and gen["version"] == "local"
  assert set(m["corpora"]) == {"generic", "verses"}
  texts = [t for s in corpus_lib.SPLITS for t in corpus_lib.load_texts(out, s)]
  assert any("Le café est très bon." in t for t in texts) and len(texts) == 121
  verses = [t for s in corpus_lib.SPLITS for t in corpus_lib.load_texts(out, s, "verses")]
  assert len(verses) == 61 and not set(verses) & set(texts)
  with open(os.path.join(out, "manifest.json")) as f:
    assert json.load(f)["corpora"]["verses"]["splits"]["train"]["docs"] >= 40
  assert os.path.exists(tmp_path / "tiny" / "generic" / "train.jsonl")
  mtime = os.path.getmtime(os.path.join(out, "generic", "train.array_record"))
  prepare_lib.prepare(out, sources=sources, progress=False)  # idempotent: nothing rewritten
  assert "up to date" in capsys.readouterr().out
  assert os.path.getmtime(os.path.join(out, "generic", "train.array_record")) == mtime
  assert not [f for _, _, fs in os.walk(out) for f in fs if f.endswith(".tmp")]


def test_prepare_domain_without_text(tmp_path):
  sources = _local_sources(tmp_path)
  empty = tmp_path / "pkgs" / "empty"
  empty.mkdir()
  (empty / "a.txt").write_text("too short")
  sources.append(sources_lib.Source("nothing", str(empty), "dir", "hollow", "x", "text",
                                    ("*.txt",)))
  with pytest.raises(DataError, match="corpus 'hollow' got no train documents"):
    prepare_lib.prepare(str(tmp_path / "out"), sources=sources, progress=False)
  assert not os.path.exists(tmp_path / "out" / "manifest.json")


def test_unknown_source_and_cli_errors(tmp_path):
  with pytest.raises(DataError, match="unknown sources"):
    sources_lib.select("no-such-source")
  with pytest.raises(DataError, match="holds no manifest.json"):  # exit 2 through cli.entry
    cli_main(["stats", f"--out={tmp_path}"])
  assert {"religious", "dictionary", "manpages", "source_code", "legal"} <= set(
      sources_lib.DOMAINS)
  generic = {s.package for s in sources_lib.SOURCES if s.corpus == "generic"}
  assert not generic & {s.package for s in sources_lib.SOURCES if s.corpus != "generic"}


def test_bundled_tiny_corpus():
  root = corpus_lib.TINY_ROOT
  size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(root) for f in fs)
  assert size < 1_500_000
  assert len(corpus_lib.list_domains(root)) >= 5
  for domain in [""] + corpus_lib.list_domains(root):
    for split in corpus_lib.SPLITS:
      assert corpus_lib.load_texts(root, split, domain)
  with open(os.path.join(root, "manifest.json")) as f:
    manifest = json.load(f)
  assert all(s["license"] and s["version"] for s in manifest["sources"])
