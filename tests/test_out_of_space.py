"""A full disk (ENOSPC, through a filesystem that fills: conftest.FullDisk) or the file-size
limit (EFBIG, `ulimit -f` in a real subprocess) outside checkpoint saves, and inside them: one
`error: OutOfSpace:` (or CheckpointError) line naming the file, exit 2, no traceback, no
temporary file left, and what was complete before kept, so a rerun with space finishes."""

import json
import os
import shlex
import subprocess
import sys

import pytest

from conftest import REPO, FullDisk, load_config, snapshot, temp_files, write_small_corpus
from pn_jax import safetensors_io, storage
from pn_jax.data import pipeline

TIMEOUT = 300


def small_config(root):
  config = load_config("pn")
  config.data.corpus = str(root)
  return config


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  return write_small_corpus(tmp_path_factory.mktemp("corpus"), limit=60_000)


def test_run_data_on_a_filling_disk_fails_in_one_error_and_resumes(corpus, tmp_path, monkeypatch):
  """Each start gets one more file written before the disk is full: every failure is an
  OutOfSpace naming a file of the workdir, leaves no temporary file and keeps every complete
  file as it was; the run that finally has space prepares what an unhindered one does."""
  config, workdir = small_config(corpus), tmp_path / "run"
  failures = []
  for allow in range(12):
    kept = {k: v for k, v in snapshot(workdir).items() if v[2]} if workdir.exists() else {}
    disk = FullDisk(workdir, allow).install(monkeypatch)
    try:
      pipeline.prepare_run_data(config, str(workdir), progress=False)
      break
    except storage.OutOfSpace as e:
      failures.append(str(e))
    finally:
      monkeypatch.undo()
    assert disk.failed and failures[-1].startswith(f"could not write {workdir}/"), failures[-1]
    assert ": No space left on device (errno 28); it needs " in failures[-1], failures[-1]
    assert temp_files(workdir) == [], failures[-1]
    now = snapshot(workdir)
    assert {k: now.get(k) for k in kept} == kept  # nothing complete was removed or changed
  assert len(failures) >= 4, failures  # the tokenizer, its record, packed set, clusters, READY
  assert any("packed-" in f for f in failures) and any("READY.json" in f for f in failures)
  reference = tmp_path / "reference"
  pipeline.prepare_run_data(config, str(reference), progress=False)
  def ready(w):
    info = json.loads((w / "data" / "READY.json").read_text())
    del info["stats"]["build_seconds"]
    return info
  assert ready(workdir) == ready(reference)  # the same tokenizer, routing and packed set


def _run_limited(cmd, limit_kib: int):
  """`cmd` in a child whose files may not grow past `limit_kib` KiB (`ulimit -f`, set by a shell
  rather than a preexec_fn, which is unsafe in a process with threads): writes beyond fail with
  EFBIG, SIGXFSZ ignored (it would kill the child otherwise)."""
  env = dict(os.environ, PYTHONPATH=str(REPO))
  script = f"ulimit -f {limit_kib}; trap '' XFSZ; exec {shlex.join(map(str, cmd))}"
  return subprocess.run(["bash", "-c", script], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=TIMEOUT)


def test_pretraining_data_over_the_file_size_limit_is_one_line(corpus, tmp_path):
  """A real `ulimit -f` below the cluster model's size: the tokenizer and packed set are
  written, clusters/model.npz is refused with EFBIG; exit 2, one line naming it, no traceback,
  no temporary file."""
  workdir = tmp_path / "run"
  out = _run_limited([sys.executable, "-m", "pn_jax.main", "--config=configs/pn.py:tiny",
                      f"--workdir={workdir}", f"--config.data.corpus={corpus}",
                      "--config.train.steps=2", "--config.train.progress_bar=false"], 200)
  assert out.returncode == 2, out.stderr[-3000:]
  assert "Traceback" not in out.stderr, out.stderr[-3000:]
  line = out.stderr.strip().splitlines()[-1]
  assert line.startswith(f"error: OutOfSpace: could not write {workdir}/clusters/model.npz: "
                         "File too large (errno 27); it needs "), line
  assert "over this process's file-size limit of 200.0 KiB (ulimit -f)" in line, line
  assert temp_files(workdir) == [] and os.listdir(workdir / "clusters") == []
  assert (workdir / "tokenizer.model").is_file()  # written before the limit bit: kept
  assert [p.name[:7] for p in (workdir / "data").iterdir()] == ["packed-"]


def test_corpus_prepare_over_the_file_size_limit_is_one_line(tmp_path):
  """`prepare` (ArrayRecord splits, whose writer reports a failed write as a RuntimeError
  naming the OS error) under a real `ulimit -f`: one OutOfSpace line, exit 2, no split or
  temporary file left."""
  src = tmp_path / "text"
  src.mkdir()
  for i in range(60):
    (src / f"doc{i}.txt").write_text(f"document {i}. " + "a few words of text " * 200)
  out_dir = tmp_path / "corpus"
  script = ("import sys; from pn_jax import cli; from pn_jax.data import prepare, sources; "
            f"src = sources.Source('mine', {str(src)!r}, 'dir', 'generic', 'own', 'text', "
            "('*.txt',)); "
            f"sys.exit(cli.entry(lambda: prepare.prepare({str(out_dir)!r}, sources=[src], "
            "progress=False) and 0)())")
  out = _run_limited([sys.executable, "-c", script], 48)
  assert out.returncode == 2, out.stderr[-3000:]
  assert "Traceback" not in out.stderr, out.stderr[-3000:]
  line = out.stderr.strip().splitlines()[-1]
  assert line.startswith(f"error: OutOfSpace: could not write {out_dir}/generic/train."), line
  assert "File too large (errno 27); it needs " in line, line
  assert temp_files(out_dir) == [] and not (out_dir / "generic" / "train.array_record").exists()


def test_checkpoint_save_over_the_file_size_limit_is_one_line(corpus, tmp_path):
  """A real tensorstore write refused (EFBIG) at the first checkpoint: the CheckpointError line
  alone, without the tracebacks orbax's threads log for each failed write."""
  prepared = tmp_path / "run"
  pipeline.prepare_run_data(small_config(corpus), str(prepared), progress=False)
  out = _run_limited([sys.executable, "-m", "pn_jax.main", "--config=configs/pn.py:tiny",
                      f"--workdir={prepared}", f"--config.data.corpus={corpus}",
                      "--config.train.steps=2", "--config.train.checkpoint_every=2",
                      "--config.train.eval_every=100", "--config.train.progress_bar=false"], 400)
  assert out.returncode == 2, out.stderr[-3000:]
  assert "Traceback" not in out.stderr and "Event loop is closed" not in out.stderr, \
      out.stderr[-5000:]
  errors = [l for l in out.stderr.splitlines() if l.startswith(("error:", "E1", "E0"))]
  assert len(errors) == 1, errors
  assert errors[0].startswith(f"error: CheckpointError: could not write checkpoint step 2 to "
                              f"{prepared}/checkpoints: File too large (errno 27); no complete "
                              "checkpoint was written"), errors[0]


@pytest.fixture
def exported(tmp_path):
  import flax.linen as nn
  import jax
  from pn_jax.model import build_model
  from pn_jax.model.transformer import init_params
  cfg = load_config("slm").model
  params = nn.unbox(init_params(build_model(cfg), jax.random.key(3)))
  out = str(tmp_path / "export")
  safetensors_io.save(out, params, cfg, metadata={"step": 1})
  return out, params, cfg


def test_a_full_disk_during_export_keeps_the_earlier_one(exported, tmp_path, monkeypatch):
  """An export that runs out of space: OutOfSpace naming the export, the new directory removed,
  the earlier export as it was."""
  out, params, cfg = exported
  before = snapshot(out)
  FullDisk(tmp_path, 0).install(monkeypatch)  # config.json (after the weights) is refused
  with pytest.raises(storage.OutOfSpace) as err:
    safetensors_io.save(out, params, cfg, metadata={"step": 2})
  monkeypatch.undo()
  assert str(err.value).startswith(f"could not write {out}: No space left on device (errno 28); "
                                   "it needs "), str(err.value)
  assert snapshot(out) == before and temp_files(tmp_path) == []
  assert sorted(os.listdir(tmp_path)) == ["export"]


def test_errors_of_native_writers_are_recognised():
  """tensorstore's and Rust's (safetensors) ways of naming an OS error in a message."""
  assert storage.error_code(ValueError("Failed to write: No space left on device "
                                       "[os_error_code='28']")) == 28
  assert storage.error_code(RuntimeError("Error while serializing: I/O error: No space left "
                                         "on device (os error 28)")) == 28
  wrapped = RuntimeError("save failed")
  wrapped.__cause__ = OSError(27, "File too large")
  assert storage.is_out_of_space(wrapped) and not storage.is_out_of_space(ValueError("x 28"))


def test_a_space_error_no_writer_named_is_still_one_line(capfd, tmp_path):
  """cli.entry's fallback: an OSError(ENOSPC) from an unexpected place is an OutOfSpace line
  (exit 2) naming its file, not a traceback."""
  from pn_jax import cli

  def main():
    raise OSError(28, "No space left on device", str(tmp_path / "somewhere.json"))

  codes = []
  cli.entry(main, exit_now=codes.append)()
  assert codes == [2]
  line = capfd.readouterr().err.strip().splitlines()[-1]
  assert line.startswith(f"error: OutOfSpace: could not write {tmp_path}/somewhere.json: No space "
                         "left on device (errno 28); it could not be written in full, its "
                         "filesystem has "), line
