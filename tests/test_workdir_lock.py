"""One writer per workdir, and runs that never write into the runs they read (issue 12: 1, 2, 5, 8).

The lock is tested with real processes (a live run, a second start of the same command, SIGTERM,
kill -9); what a refused or reading run writes is checked by snapshots of every file (path, size,
mtime, sha256): we run as root, so a chmod could not stop a write.
"""

import errno
import fcntl
import os
import shutil
import signal
import socket
import subprocess
import sys

import pytest

from conftest import copy_workdir, load_config, quiet, snapshot
from test_reliability import (LONG, cli, latest, result_line, run_cli, start_cli, train_losses,
                              wait_for)
from pn_jax import modes, workdir_lock
from pn_jax.config import ConfigError
from pn_jax.modes.pretrain import pretrain
from pn_jax.train.preflight import WorkdirError

DOMAIN = "legal"





@pytest.fixture(scope="module")
def dense_run(tmp_path_factory):
  """A tiny SLM pretraining run that keeps its data cache inside itself (config.data.cache_dir
  under the workdir): a stage reading it must not add to that cache either."""
  workdir = tmp_path_factory.mktemp("slm")
  config = quiet(load_config("slm"), steps=4, eval_every=4, checkpoint_every=4)
  config.data.cache_dir = str(workdir / "cache")
  pretrain(config, str(workdir))
  return workdir


def finetune_config(init_from, **train):
  config = quiet(load_config("finetune"), **train)
  config.init_from = str(init_from)
  config.data.domain = DOMAIN
  return config


def subdir(tmp_path, name):
  (tmp_path / name).mkdir()
  return tmp_path / name


# --- item 2: the workdir lock -----------------------------------------------------------------


def test_second_start_on_a_live_run_exits_2_and_the_lock_dies_with_its_holder(prepared, tmp_path):
  """A double-submitted job: the second process exits 2 naming the first's pid and host and
  leaves the first's run alone; after SIGTERM a rerun resumes; kill -9 leaves no stale lock."""
  workdir = copy_workdir(prepared, tmp_path)
  first = start_cli(cli(workdir, *LONG), subdir(tmp_path, "first"))
  try:
    wait_for(lambda: len(train_losses(workdir)) >= 2, first, tmp_path / "first")
    second = run_cli(cli(workdir, *LONG), timeout=120)  # (before the lock: it trained on)
    os.kill(first.pid, signal.SIGTERM)
    rc = first.wait(timeout=120)
  finally:
    if first.poll() is None:
      first.kill()
  assert second.returncode == 2, second.stderr[-3000:]
  errors = [line for line in second.stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1 and errors[0].startswith(
      f"error: WorkdirError: --workdir {workdir} is in use by pid {first.pid} on host "
      f"{socket.gethostname()} (pretrain, since "), second.stderr[-3000:]
  assert "wait for it to finish or stop it" in errors[0]
  assert "pn_jax.data:" not in second.stderr  # refused before data preparation

  assert rc == 128 + signal.SIGTERM, (tmp_path / "first" / "stderr").read_text()[-3000:]
  stopped = result_line((tmp_path / "first" / "stdout").read_text())["stopped_at"]
  # one writer: every step logged once, in order; one TensorBoard file; the first's checkpoint
  assert [s for s, _ in train_losses(workdir)] == list(range(1, stopped + 1))
  assert len(os.listdir(os.path.join(workdir, "tb"))) == 1
  assert latest(workdir) == stopped

  rerun = start_cli(cli(workdir, *LONG), subdir(tmp_path, "rerun"))
  try:
    wait_for(lambda: train_losses(workdir)[-1][0] > stopped, rerun, tmp_path / "rerun")
    os.kill(rerun.pid, signal.SIGKILL)
    rerun.wait(timeout=60)
  finally:
    if rerun.poll() is None:
      rerun.kill()
  assert f"resumed from step {stopped}" in (tmp_path / "rerun" / "stderr").read_text()
  lock_file = os.path.join(workdir, workdir_lock.LOCK)
  assert workdir_lock.read_holder(lock_file)["pid"] == rerun.pid  # its info stays: not the lock
  with workdir_lock.hold(workdir, "test"):  # but the kernel dropped its flock
    assert workdir_lock.read_holder(lock_file)["pid"] == os.getpid()


def test_a_refused_start_writes_nothing(prepared, tmp_path):
  workdir = copy_workdir(prepared, tmp_path)
  with workdir_lock.hold(workdir, "test"):
    before = snapshot(workdir)
    out = run_cli(cli(workdir, "--config.train.steps=2"))
    after = snapshot(workdir)
  assert out.returncode == 2, out.stderr[-3000:]
  assert f"is in use by pid {os.getpid()} on host {socket.gethostname()} (test, since " in \
      out.stderr.strip().splitlines()[-1]
  assert after == before


@pytest.mark.parametrize("driver", [
    "pn_jax.sweep --sweep=configs/sweeps/hkm_tiny.py:steps=2 --mode=local",
    "pn_jax.experiment --config=configs/experiments/cpu_small.py --docs={tmp}/docs"])
def test_a_second_driver_on_a_root_is_refused(tmp_path, driver):
  root = tmp_path / "root"
  with workdir_lock.hold(str(root), "test"):
    before = snapshot(root)
    out = run_cli([sys.executable, "-m", *driver.format(tmp=tmp_path).split(), f"--root={root}"])
  after = snapshot(root)
  assert out.returncode == 2, out.stderr[-3000:]
  assert out.stderr.strip().splitlines()[-1].startswith(
      f"error: WorkdirError: --root {root} is in use by pid {os.getpid()} on host "), out.stderr
  assert after == before


def test_lock_is_released_on_every_exit_and_refuses_a_second_holder(tmp_path):
  workdir = str(tmp_path / "run")
  with pytest.raises(RuntimeError, match="boom"):
    with workdir_lock.hold(workdir, "pretrain"):
      with pytest.raises(WorkdirError, match=f"pid {os.getpid()} .*pretrain, since"):
        with workdir_lock.hold(workdir + "/", "specialize"):  # the same file: refused
          pass
      raise RuntimeError("boom")
  with workdir_lock.hold(workdir, "pretrain"):  # released by the exception
    pass
  assert os.path.exists(os.path.join(workdir, workdir_lock.LOCK))  # never unlinked


def test_object_stores_and_filesystems_without_flock_are_not_locked(tmp_path, monkeypatch):
  with workdir_lock.hold("gs://bucket/run", "pretrain"):
    pass
  assert not os.path.exists("gs:")

  def no_flock(fd, op):
    raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))
  monkeypatch.setattr(fcntl, "flock", no_flock)
  with workdir_lock.hold(str(tmp_path / "nfs"), "pretrain"):  # a warning, and the run goes on
    pass


# --- item 1: --workdir apart from init_from -----------------------------------------------------


@pytest.fixture
def source(dense_run, tmp_path):
  """A copy of the dense run (a refusal that fails would destroy it) and its snapshot."""
  path = tmp_path / "slm"
  shutil.copytree(dense_run, path)
  return path, snapshot(path)


@pytest.mark.parametrize("case", ["same", "trailing_slash", "relative", "symlink", "inside",
                                  "contains", "teacher"])
def test_workdir_equal_to_or_nested_with_init_from_is_refused(source, tmp_path, monkeypatch,
                                                              case):
  run, before = source
  config = finetune_config(run, steps=2, eval_every=2)
  workdir = {"same": str(run), "trailing_slash": f"{run}/", "inside": str(run / "legal"),
             "contains": str(tmp_path), "teacher": str(run)}.get(case)
  if case == "relative":
    monkeypatch.chdir(tmp_path)
    workdir = "./slm/../slm"
  if case == "symlink":
    os.symlink(run, tmp_path / "link")
    workdir = str(tmp_path / "link")
  if case == "teacher":
    config.init_from = str(tmp_path / "other")
    config.distill.teacher = str(run)
  with pytest.raises(ConfigError, match="must not write into the run it reads") as e:
    modes.MODES["specialize"](config, workdir)
  assert str(run) in str(e.value) and f"--workdir {workdir} " in str(e.value)
  assert snapshot(run) == before


# --- item 5: reading stages write nothing into the runs they read ------------------------------


def test_specialize_eval_sample_export_write_nothing_into_init_from(dense_run, tmp_path):
  before = snapshot(dense_run)
  ft = str(tmp_path / "ft")
  modes.MODES["specialize"](finetune_config(dense_run, steps=2, eval_every=2), ft)
  config = quiet(load_config("finetune"))
  modes.MODES["eval"](config, ft)
  modes.MODES["eval"](config, str(dense_run))
  config.sample.update(max_new_tokens=2, num_samples=1)
  modes.MODES["sample"](config, ft)
  modes.MODES["export"](config, ft)
  assert snapshot(dense_run) == before
  assert os.path.exists(os.path.join(ft, "export", "model.safetensors"))


def test_a_read_only_pretraining_run_is_a_source(dense_run, tmp_path):
  """The run on a real read-only mount (a private mount namespace, gone with the process); a
  domain no other test reads, so its splits are not in the run's data cache yet."""
  if shutil.which("unshare") is None or subprocess.run(
      ["unshare", "-m", "sh", "-c", f"mount --bind -o ro {tmp_path} {tmp_path}"],
      capture_output=True).returncode != 0:
    pytest.skip("needs unshare -m and mount (root)")
  ft = tmp_path / "ft"
  cmd = cli(ft, "--mode=specialize", f"--config.init_from={dense_run}",
            "--config.data.domain=quotes", "--config.train.steps=2",
            "--config.train.eval_every=2", config="configs/finetune.py:tiny")
  shell = f"mount --bind -o ro {dense_run} {dense_run} && exec \"$@\""
  out = run_cli(["unshare", "-m", "sh", "-c", shell, "sh", *map(str, cmd)])
  assert out.returncode == 0, out.stderr[-3000:]
  assert result_line(out.stdout)["steps"] == 2


# --- item 8a: a refused config leaves no workdir ------------------------------------------------


def test_a_config_that_fails_validation_leaves_no_workdir(dense_run, tmp_path):
  bad = quiet(load_config("pn"))
  bad.model.n_heads = 3  # does not divide d_model
  with pytest.raises(ConfigError, match="n_heads"):
    pretrain(bad, str(tmp_path / "pretrain"))
  with pytest.raises(ConfigError, match="train.steps"):
    modes.MODES["specialize"](finetune_config(dense_run, steps=0), str(tmp_path / "specialize"))
  assert os.listdir(tmp_path) == []


# --- issue 25, item 8: an error raised holding the lock leaves no workdir ---------------------


def test_an_error_after_the_lock_removes_the_workdir_the_run_created(tmp_path):
  """A data error raised holding the lock (here a corpus that does not exist) used to leave a
  new workdir holding only LOCK. A workdir the run did not create, or that holds anything
  else, stays."""
  from pn_jax.data import DataError
  config = quiet(load_config("pn"))
  config.data.corpus = str(tmp_path / "no_corpus")
  fresh = tmp_path / "fresh"
  with pytest.raises(DataError, match="no_corpus"):
    pretrain(config, str(fresh))
  assert not fresh.exists()
  kept = tmp_path / "kept"
  kept.mkdir()
  with pytest.raises(DataError, match="no_corpus"):
    pretrain(config, str(kept))
  assert os.listdir(kept) == [workdir_lock.LOCK]
  with pytest.raises(RuntimeError, match="boom"):
    with workdir_lock.hold(str(tmp_path / "busy"), "test"):
      (tmp_path / "busy" / "notes.txt").write_text("the run wrote this")
      raise RuntimeError("boom")
  assert sorted(os.listdir(tmp_path / "busy")) == [workdir_lock.LOCK, "notes.txt"]


def test_a_lock_file_removed_between_open_and_flock_is_not_held(tmp_path, monkeypatch):
  """The race the removal opens: a second process opened the old LOCK just before the first
  unlinked it and locks it just after. try_lock notices the file is gone and locks the new one."""
  workdir = tmp_path / "run"
  workdir.mkdir()
  real, calls = fcntl.flock, []

  def flock_after_unlink(fd, op):
    if not calls:  # the first attempt: its LOCK is removed before it gets the flock
      os.unlink(workdir / workdir_lock.LOCK)
    calls.append(op)
    return real(fd, op)

  monkeypatch.setattr(fcntl, "flock", flock_after_unlink)
  fd = workdir_lock.try_lock(str(workdir), "test")
  try:
    assert len(calls) == 2 and os.path.samestat(os.fstat(fd), os.stat(workdir / "LOCK"))
  finally:
    os.close(fd)
