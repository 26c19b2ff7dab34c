"""Reliability: preemption signals, kill -9 mid-save, exact resume, the NaN guard, bad workdirs.

These run the real CLI in subprocesses and send real signals: a preempted or crashed run must
lose at most the steps since its last checkpoint, and never pick a half-written one.
"""

import json
import math
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from conftest import REPO, copy_workdir, load_config, train_tiny_pn
from pn_jax import modes
from pn_jax.config import ConfigError
from pn_jax.model import build_model
from pn_jax.modes.pretrain import pretrain
from pn_jax.parallel import mesh as mesh_lib
from pn_jax.train import preflight
from pn_jax.train.checkpoint import CheckpointError, Checkpointer
from pn_jax.train.optimizer import make_optimizer
from pn_jax.train.state import state_shardings

ENV = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
LONG = ["--config.train.steps=100000", "--config.train.log_every=1",
        "--config.train.checkpoint_every=1000", "--config.train.eval_every=100000"]

# Runs pn_jax.main with grain's iterator-state writer stalled on the 2nd checkpoint (after
# touching a marker file), so the test can SIGKILL the process deterministically mid-save.
SLOW_SECOND_SAVE = """
import os, sys, time, runpy, grain
save, calls = grain.checkpoint.CheckpointHandler.save, []
def slow(self, *a, **k):
  calls.append(1)
  if len(calls) == 2:
    open(os.environ["PN_TEST_MARKER"], "w").close()
    time.sleep(600)
  return save(self, *a, **k)
grain.checkpoint.CheckpointHandler.save = slow
runpy.run_module("pn_jax.main", run_name="__main__", alter_sys=True)
"""


def cli(workdir, *overrides, config="configs/pn.py:tiny", code=None):
  prog = ["-c", code] if code else ["-m", "pn_jax.main"]
  return [sys.executable, *prog, f"--config={config}", f"--workdir={workdir}", *overrides]


def run_cli(cmd, timeout=300):
  return subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=timeout)


def start_cli(cmd, tmp_path, env=None):
  """Popen with output to files (absl logs a lot: a pipe could fill up and block the child)."""
  out, err = open(tmp_path / "stdout", "w"), open(tmp_path / "stderr", "w")
  return subprocess.Popen(cmd, cwd=REPO, env=env or ENV, stdout=out, stderr=err)


def wait_for(predicate, proc, tmp_path, timeout=300):
  deadline = time.monotonic() + timeout
  while not predicate():
    if proc.poll() is not None:
      pytest.fail(f"exited {proc.returncode} early:\n{(tmp_path / 'stderr').read_text()[-3000:]}")
    if time.monotonic() > deadline:
      proc.kill()
      pytest.fail("timed out waiting for the run")
    time.sleep(0.05)


def train_losses(workdir) -> list[tuple[int, float]]:
  path = pathlib.Path(workdir, "metrics.jsonl")
  if not path.exists():
    return []
  rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
  return [(r["step"], r["loss"]) for r in rows if r["split"] == "train"]


def result_line(stdout: str) -> dict:
  return json.loads(stdout.strip().splitlines()[-1])


def strict_json(text: str):
  """json.loads refusing NaN and Infinity, which Python accepts and other parsers do not."""
  def refuse(constant):
    raise ValueError(f"not strict JSON: {constant}")
  return json.loads(text, parse_constant=refuse)


def latest(workdir):
  return Checkpointer(workdir, read_only=True).latest_step()


def interrupt(prepared, tmp_path, sig, overrides=LONG):
  """Starts a long CLI run, sends `sig` once it has logged 3 steps; -> (workdir, rc, stdout)."""
  workdir = copy_workdir(prepared, tmp_path, f"run_{sig.name}")
  proc = start_cli(cli(workdir, *overrides), tmp_path)
  try:
    wait_for(lambda: len(train_losses(workdir)) >= 3, proc, tmp_path)
    os.kill(proc.pid, sig)
    rc = proc.wait(timeout=120)
  finally:
    if proc.poll() is None:
      proc.kill()
  return workdir, rc, (tmp_path / "stdout").read_text(), (tmp_path / "stderr").read_text()


# --- preemption -----------------------------------------------------------------------------


def test_sigint_saves_the_current_step_and_exits_130(prepared, tmp_path):
  workdir, rc, out, err = interrupt(prepared, tmp_path, signal.SIGINT)
  assert rc == 128 + signal.SIGINT, err[-3000:]
  result = result_line(out)
  assert result["stop_reason"] == "SIGINT" and result["stopped_at"] >= 3
  assert latest(workdir) == result["stopped_at"]  # saved at the step it stopped, not step 0
  assert train_losses(workdir)[-1][0] == result["stopped_at"]


def test_sigterm_then_resume_equals_an_uninterrupted_run(prepared, tmp_path):
  """SIGTERM at an arbitrary step, restart: same per-step losses as a run never interrupted
  (params, optimizer and grain iterator state all resume exactly)."""
  workdir, rc, out, err = interrupt(prepared, tmp_path, signal.SIGTERM)
  assert rc == 128 + signal.SIGTERM, err[-3000:]
  s = result_line(out)["stopped_at"]
  assert latest(workdir) == s
  until = [f"--config.train.stop_at_step={s + 4}"]
  resumed = run_cli(cli(workdir, *LONG, *until))
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert f"resumed from step {s} " in resumed.stderr
  straight = copy_workdir(prepared, tmp_path, "straight")
  ref = run_cli(cli(straight, *LONG, *until))
  assert ref.returncode == 0, ref.stderr[-3000:]
  expected = train_losses(straight)
  assert [step for step, _ in expected] == list(range(1, s + 5))
  assert train_losses(workdir) == expected


def test_kill9_mid_save_keeps_the_previous_checkpoint(prepared, tmp_path):
  workdir = copy_workdir(prepared, tmp_path)
  ckpts = pathlib.Path(workdir, "checkpoints")
  marker = tmp_path / "saving"
  overrides = [*LONG[:2], "--config.train.checkpoint_every=3", LONG[3]]
  proc = start_cli(cli(workdir, *overrides, code=SLOW_SECOND_SAVE), tmp_path,
                   env={**ENV, "PN_TEST_MARKER": str(marker)})
  try:
    wait_for(marker.exists, proc, tmp_path)  # inside the save of step 6
    tmp_dirs = [p.name for p in ckpts.iterdir() if "orbax-checkpoint-tmp" in p.name]
    assert tmp_dirs and all(name.startswith("6.") for name in tmp_dirs), tmp_dirs
  finally:
    proc.send_signal(signal.SIGKILL)
  assert proc.wait(timeout=60) == -signal.SIGKILL
  assert any("orbax-checkpoint-tmp" in p.name for p in ckpts.iterdir())  # the torn save is there
  assert latest(workdir) == 3  # ... and is not picked

  rerun = run_cli(cli(workdir, *overrides[1:], "--config.train.steps=7"))
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert "resumed from step 3 " in rerun.stderr
  assert result_line(rerun.stdout)["step"] == 7
  assert sorted(p.name for p in ckpts.iterdir()) == ["3", "6", "7"]  # tmp dir cleaned up


# --- NaN guard ------------------------------------------------------------------------------


def test_nan_stop_names_the_step_and_keeps_the_last_good_checkpoint(prepared, tmp_path):
  """lr=1e30 really overflows: step 1's update makes the params ~1e30, step 2's loss is NaN."""
  workdir = copy_workdir(prepared, tmp_path)
  out = run_cli(cli(workdir, "--config.train.steps=20", "--config.train.checkpoint_every=1",
                    "--config.train.log_every=1",
                    "--config.optim.lr=1e30", "--config.optim.warmup_steps=0"))
  assert out.returncode == 2, out.stderr[-3000:]
  last = out.stderr.strip().splitlines()[-1]
  assert last.startswith("error: TrainingDiverged: non-finite loss (nan)"), last
  assert "at step 2; the last good checkpoint is step 1" in last
  assert latest(workdir) == 1
  assert [step for step, _ in train_losses(workdir)] == [1]
  kept = _params_at(workdir, load_config("pn"), 1)  # committed despite the async save + exit
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(kept))


def _abstract_params(config):
  mesh, rules = mesh_lib.make_mesh(config), mesh_lib.logical_rules(config)
  tx, _ = make_optimizer(config)
  with mesh_lib.activate(mesh, rules):
    return mesh, rules, state_shardings(build_model(config.model), tx, mesh, rules)[0].params


def _params_at(workdir, config, step):
  mesh, rules, abstract = _abstract_params(config)
  with mesh_lib.activate(mesh, rules):
    return jax.device_get(Checkpointer(workdir, read_only=True).restore_params(abstract, step))


def test_nan_skip_leaves_params_unchanged_and_counts(prepared, tmp_path, monkeypatch):
  """An out-of-vocabulary token id (a real corrupt batch: jnp.take fills NaN) at step 4."""
  real, calls = mesh_lib.global_batch, []

  def poisoned(local, mesh):
    calls.append(1)
    if len(calls) == 4:
      local = {**local, "inputs": np.full_like(local["inputs"], 10_000)}
    return real(local, mesh)

  monkeypatch.setattr(mesh_lib, "global_batch", poisoned)
  config = load_config("pn")
  config.train.update(steps=6, nan_policy="skip", checkpoint_every=1, keep_checkpoints=10,
                      log_every=1, eval_every=100, async_checkpoint=False)
  workdir = copy_workdir(prepared, tmp_path)
  pretrain(config, workdir)

  p3, p4, p5 = (_params_at(workdir, config, s) for s in (3, 4, 5))
  jax.tree.map(np.testing.assert_array_equal, p3, p4)  # the bad update was dropped
  assert not np.array_equal(p4["embed"], p5["embed"])  # and training went on
  rows = [strict_json(x) for x in pathlib.Path(workdir, "metrics.jsonl").read_text().splitlines()]
  train = {r["step"]: r for r in rows if r["split"] == "train"}
  assert [train[s]["skipped_steps"] for s in range(1, 7)] == [0, 0, 0, 1, 1, 1]
  # the skipped step's loss is null (strict JSON), not a bare NaN
  assert train[4]["loss"] is None and all(math.isfinite(train[s]["loss"]) for s in (5, 6))

  # The count lives in the optimizer state: it survives a resume. The resumed run's one step
  # (and its eval) is poisoned too: the result line main prints has non-finite losses, and is
  # strict JSON all the same (issue 25, item 8: it printed bare NaNs).
  monkeypatch.setattr(mesh_lib, "global_batch", lambda local, mesh: real(
      {**local, "inputs": np.full_like(local["inputs"], 10_000)}, mesh))
  config.train.steps = 7
  record = strict_json(modes.result_line("pretrain", pretrain(config, workdir)))
  assert record["mode"] == "pretrain" and record["step"] == 7 and record["skipped_steps"] == 2
  assert record["loss"] is None and record["eval_loss"] is None
  rows = [strict_json(x) for x in pathlib.Path(workdir, "metrics.jsonl").read_text().splitlines()]
  assert [r["skipped_steps"] for r in rows if r["split"] == "train"][-1] == 2
  strict_json(pathlib.Path(workdir, "costs.json").read_text())  # (step 7's eval loss: null)


# --- bad inputs -----------------------------------------------------------------------------


@pytest.mark.parametrize("flag,message", [
    ("--config.train.step=5",
     "error: ConfigError: unknown config key 'train.step' (in --config.train.step=5); closest "
     "known keys: train.steps"),
    ("--config.model.k=2.5",
     "error: UsageError: flag --config.model.k=2.5: invalid literal for int() with base 10: "
     "'2.5'"),
    ("--config=configs/nope.py",
     "error: ConfigError: --config: config file 'configs/nope.py' does not exist"),
])
def test_bad_flags_are_one_line_errors(tmp_path, flag, message):
  cmd = cli(str(tmp_path / "w"))
  if flag.startswith("--config="):  # replaces the config file
    cmd = [a for a in cmd if not a.startswith("--config=")]
  out = run_cli(cmd + [flag])
  assert out.returncode == 2, out.stderr[-3000:]
  assert out.stderr.strip().splitlines()[-1].startswith(message)
  assert "Traceback" not in out.stderr


def test_indivisible_mesh_is_a_config_error(prepared, tmp_path):
  """validate() cannot see which dims a mesh axis splits; the resolved shardings can."""
  config = load_config("pn")
  config.model.update(d_model=36, n_heads=2)  # head_dim 18; d_model is split over fsdp=8
  config.mesh.update(data=1, fsdp=8, tensor=1)
  with pytest.raises(ConfigError, match=r"config\.mesh: 10 parameter\(s\) cannot be split "
                     r"evenly.*\['wk'\] \(2, 36, 2, 18\): dim 1 \(36\) is split over mesh fsdp=8"):
    pretrain(config, copy_workdir(prepared, tmp_path))


@pytest.fixture(scope="module")
def trained(prepared, tmp_path_factory):
  """A tiny PN run with checkpoints at steps 2 and 4."""
  return train_tiny_pn(prepared, tmp_path_factory.mktemp("trained"), steps=4)


def test_cli_refuses_an_incompatible_checkpoint(trained, tmp_path):
  workdir = shutil.copytree(trained, tmp_path / "run")
  out = run_cli(cli(workdir, "--config.train.steps=6", config="configs/pn.py:tiny,h=4"))
  assert out.returncode == 2, out.stderr[-3000:]
  assert "error: CheckpointError: checkpoint step 4 (params) does not match" in out.stderr
  assert "['T_in']: checkpoint (2, 64, 256, 8), this config (2, 64, 256, 4)" in out.stderr


def test_corrupt_latest_checkpoint_names_the_fallback(trained, tmp_path):
  """A torn array file in step 4: exit 2 saying so; moving it aside resumes from step 2."""
  workdir = shutil.copytree(trained, tmp_path / "run")
  for f in (workdir / "checkpoints" / "4" / "opt_state").rglob("d/*"):
    with open(f, "r+b") as fh:
      fh.truncate(8)
  cmd = cli(workdir, "--config.train.steps=5", "--config.train.eval_every=100")
  out = run_cli(cmd)
  assert out.returncode == 2, out.stderr[-3000:]
  # The error line, wherever it is: a failed tensorstore read can leave asyncio noise after it.
  line = next((l for l in out.stderr.splitlines() if l.startswith("error: ")), out.stderr[-2000:])
  assert line.startswith(f"error: CorruptCheckpoint: checkpoint step 4 in {workdir}/checkpoints "
                         "is corrupt or incomplete"), line
  assert f"move {workdir}/checkpoints/4 aside to resume from step 2" in line
  assert "tensorstore_spec" not in line and len(line) < 1000

  shutil.move(workdir / "checkpoints" / "4", tmp_path / "step4_bad")
  out = run_cli(cmd)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "resumed from step 2 " in out.stderr


def test_checkpointer_errors_for_specialize(trained, tmp_path):
  """What `specialize` sees: no checkpoint, an empty dir, a non-PN (dense) checkpoint."""
  pn = load_config("pn")
  mesh, rules, abstract = _abstract_params(pn)
  with mesh_lib.activate(mesh, rules):
    for where in (tmp_path / "missing", tmp_path / "empty"):
      if where.name == "empty":
        (where / "checkpoints").mkdir(parents=True)
      with pytest.raises(CheckpointError,
                         match=re.escape(f"no checkpoint found in {where}/checkpoints")):
        Checkpointer(str(where), read_only=True).restore_params(abstract)
    with pytest.raises(CheckpointError, match=r"step 3 is not among .*: \[2, 4\]"):
      Checkpointer(str(trained), read_only=True).restore_params(abstract, step=3)

  slm = load_config("slm")  # a dense checkpoint where a PN one is expected
  mesh, rules, dense = _abstract_params(slm)
  tx, _ = make_optimizer(slm)
  with mesh_lib.activate(mesh, rules):
    from pn_jax.train.state import create_state
    state, _ = create_state(build_model(slm.model), tx, mesh, rules, jax.random.key(0))
    ckpt = Checkpointer(str(tmp_path / "dense"), async_save=False)
    ckpt.save(1, state, slm)
    ckpt.close()
  mesh, rules, abstract = _abstract_params(pn)
  with mesh_lib.activate(mesh, rules):
    with pytest.raises(CheckpointError, match=r"(?s)checkpoint step 1 \(params\) does not "
                       r"match.*\['T_in'\]: checkpoint missing, this config \(2, 64, 256, 8\)"):
      Checkpointer(str(tmp_path / "dense"), read_only=True).restore_params(abstract)


def test_corpus_without_text_is_a_one_line_data_error(tmp_path):
  from pn_jax.data import corpus as corpus_lib
  root = tmp_path / "corpus"
  for split in corpus_lib.SPLITS:
    corpus_lib.write_docs(corpus_lib.split_path(str(root), split), [{"text": "  "}] * 20)
  out = run_cli(cli(str(tmp_path / "w"), f"--config.data.corpus={root}"))
  assert out.returncode == 2, out.stderr[-3000:]
  lines = [x for x in out.stderr.splitlines() if x.startswith("error:")]
  assert lines == [f"error: DataError: the generic corpus has no text in split 'train' "
                   f"({root}/generic/train.array_record); rebuild it with `python -m pn_jax.data "
                   "prepare` or choose another domain/split"]


# --- workdir --------------------------------------------------------------------------------


def test_unwritable_workdir_fails_before_any_work(tmp_path):
  """A workdir under a regular file: a real ENOTDIR (chmod would not stop root, tests' user)."""
  blocker = tmp_path / "a_file"
  blocker.write_text("not a directory")
  out = run_cli(cli(str(blocker / "run")))
  assert out.returncode == 2, out.stderr[-3000:]
  assert out.stderr.strip().splitlines()[-1] == (
      f"error: WorkdirError: --workdir {blocker}/run is not writable (Not a directory at "
      f"{blocker}/run); choose a writable directory")
  assert "pn_jax.data:" not in out.stderr  # failed before data preparation


def test_disk_too_small_for_a_checkpoint_fails_before_training(prepared, tmp_path, monkeypatch):
  config = load_config("pn")
  config.train.update(steps=4, async_checkpoint=False)
  mesh, rules, _ = _abstract_params(config)
  tx, _ = make_optimizer(config)
  with mesh_lib.activate(mesh, rules):
    need = preflight.state_bytes(state_shardings(build_model(config.model), tx, mesh, rules)[0])
  assert need > 7_000_000  # params + AdamW moments of the tiny PN, in float32
  usage = shutil.disk_usage(tmp_path)._replace(free=int(1.5 * need))
  monkeypatch.setattr(preflight.shutil, "disk_usage", lambda path: usage)
  workdir = copy_workdir(prepared, tmp_path)
  with pytest.raises(preflight.WorkdirError,
                     match=r"has 10\.1 MiB free but a checkpoint needs about 13\.5 MiB "
                     r"\(2 x 6\.8 MiB of params \+ optimizer state\); free some space"):
    pretrain(config, workdir)
  assert train_losses(workdir) == [] and latest(workdir) is None


def test_disk_filling_up_mid_run_names_the_kept_checkpoint(prepared, tmp_path, monkeypatch):
  """A save that the filesystem refuses (tensorstore's ENOSPC, as orbax raises it) stops the run
  with a CheckpointError naming the surviving step; with space again, the rerun resumes there."""
  import orbax.checkpoint as ocp
  config = load_config("pn")
  config.train.update(steps=6, checkpoint_every=2, eval_every=100, async_checkpoint=False)
  workdir = copy_workdir(prepared, tmp_path)
  real_save = ocp.CheckpointManager.save

  def full_disk(self, step, *args, **kwargs):
    if step == 4:  # the message tensorstore gives for a write that hit ENOSPC
      raise ValueError('RESOURCE_EXHAUSTED: Error writing "1.0.count/0" in OCDBT database: '
                       "Failed to write 1748992 bytes to file 8: No space left on device "
                       "[os_error_code='28']")
    return real_save(self, step, *args, **kwargs)

  monkeypatch.setattr(ocp.CheckpointManager, "save", full_disk)
  with pytest.raises(CheckpointError) as err:
    pretrain(config, workdir)
  assert str(err.value) == (
      f"could not write checkpoint step 4 to {workdir}/checkpoints: No space left on device "
      "(errno 28); the last complete checkpoint, step 2, is kept: fix the cause and rerun to "
      "resume from it")
  assert latest(workdir) == 2

  monkeypatch.setattr(ocp.CheckpointManager, "save", real_save)
  assert pretrain(config, workdir)["step"] == 6
  assert latest(workdir) == 6


def test_errors_that_are_not_storage_failures_are_not_relabelled():
  from pn_jax.train.checkpoint import storage_failure
  assert storage_failure(OSError(30, "Read-only file system")) == \
      "Read-only file system (errno 30)"
  wrapped = RuntimeError("save failed")
  wrapped.__cause__ = PermissionError(13, "denied")
  assert storage_failure(wrapped) == "Permission denied (errno 13)"
  assert storage_failure(ValueError("shapes (2, 3) and (3, 4) differ")) is None


def test_wall_clock_checkpoints(prepared, tmp_path):
  """train.checkpoint_every_minutes saves whenever that much time has passed since the last
  save, whatever the step interval (here: due at every step)."""
  config = load_config("pn")
  config.train.update(steps=4, checkpoint_every=1000, checkpoint_every_minutes=1e-9,
                      keep_checkpoints=10, eval_every=100, async_checkpoint=False)
  workdir = copy_workdir(prepared, tmp_path)
  pretrain(config, workdir)
  assert sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints"))) == [1, 2, 3, 4]

  config.train.checkpoint_every_minutes = -1.0
  with pytest.raises(ConfigError, match="train.checkpoint_every_minutes: must be >= 0"):
    pretrain(config, copy_workdir(prepared, tmp_path, "bad"))
