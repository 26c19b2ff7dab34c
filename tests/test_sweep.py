"""Sweeps: a 2x2 h/m grid runs end to end on CPU, finished points are skipped, results gathered."""

import csv
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import REPO, write_small_corpus
from pn_jax import sweep as sweep_lib
from pn_jax import sweep_results
from pn_jax.config import ConfigError
from pn_jax.train import metrics



@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory):
  """A ~200 KB slice of the bundled corpus: data prep in ~2 s, the sweep tests the sweep."""
  return write_small_corpus(tmp_path_factory.mktemp("corpus"))


def _env(devices=1):
  # one device and cheap XLA compiles: each point is a few seconds of compile
  return {**os.environ,
          "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices} "
                       "--xla_backend_optimization_level=0 "
                       "--xla_llvm_disable_expensive_passes=true"}


def _sweep(args, env_devices=1):
  return subprocess.run([sys.executable, "-m", "pn_jax.sweep", *args], cwd=REPO,
                        env=_env(env_devices), capture_output=True, text=True, timeout=300)


def test_tiny_sweep_runs_skips_and_gathers(small_corpus, tmp_path):
  root = tmp_path / "sweep"
  spec = f"--sweep=configs/sweeps/hkm_tiny.py:steps=2,corpus={small_corpus}"
  out = _sweep([spec, f"--root={root}", "--mode=local"])
  assert out.returncode == 0, out.stderr[-4000:]
  assert out.stderr.count("data prepared by h=4,m=2 reused") == 3  # same k: prepared once
  # A bar follows each point's steps while it runs (its own output goes to sweep.log).
  bars = [part for part in out.stderr.replace("\r", "\n").splitlines() if " 2/2 [" in part]
  assert {b.split(":")[0] for b in bars} == {"h=4,m=2", "h=4,m=4", "h=8,m=2", "h=8,m=4"}, bars

  names = ["h=4,m=2", "h=4,m=4", "h=8,m=2", "h=8,m=4"]
  for name in names:
    assert (root / name / "checkpoints" / "2").is_dir(), name
  with open(root / "results.csv") as f:
    rows = list(csv.DictReader(f))
  assert [r["name"] for r in rows] == names
  assert {r["status"] for r in rows} == {"done"} and {r["step"] for r in rows} == {"2"}
  assert all(np.isfinite(float(r["eval_loss"])) and float(r["eval_loss"]) > 0 for r in rows)
  params = {r["name"]: int(r["params"]) for r in rows}
  assert params["h=8,m=2"] > params["h=4,m=2"]  # the shared tensor grows with h
  md = (root / "results.md").read_text()
  assert md.startswith("| name | model.h | model.m | status |") and md.count("\n") == 6
  assert "| h=8,m=4 | 8 | 4 | done | 2 |" in md and md in out.stdout
  assert (root / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

  # Re-running does nothing but gather; a longer run makes every point unfinished again.
  again = _sweep([spec, f"--root={root}", "--mode=local"])
  assert again.returncode == 0 and again.stderr.count("done, skipped") == 4, again.stderr[-2000:]
  longer = _sweep([spec.replace("steps=2", "steps=4"), f"--root={root}", "--mode=print"])
  commands = longer.stdout.strip().splitlines()
  assert longer.returncode == 0 and len(commands) == 4
  assert f"--workdir={root}/h=4,m=2" in commands[0] and "--config.train.steps=4" in commands[0]


def test_expand_validates_every_point(tmp_path):
  sweep = dict(config="configs/pn.py:tiny", points=sweep_lib.product(
      **{"model.h": [4], "model.m": [2, 8]}))
  with pytest.raises(ConfigError, match=r"sweep point h=4,m=8: config.model.m: code length m=8"):
    sweep_lib.expand(sweep, str(tmp_path))
  with pytest.raises(ConfigError, match=r"unknown config key 'model.hh'"):
    sweep_lib.expand(dict(config="configs/pn.py:tiny", points=[{"model.hh": 1}]), str(tmp_path))


def test_names_slurm_script_and_missing_points(tmp_path):
  assert sweep_lib.point_name({"model.h": 4, "optim.lr": 0.001}) == "h=4,lr=0.001"
  assert sweep_lib.point_name({"model.m": 2, "data.m": 3}) == "model.m=2,data.m=3"
  sweep = dict(config="configs/pn.py:tiny", base={"train.steps": 7},
               points=sweep_lib.product(**{"model.k": [2, 4], "model.h": [8]}))
  points = sweep_lib.expand(sweep, str(tmp_path / "s"), python="python3")
  assert [p.config.model.k for p in points] == [2, 4] and points[0].config.train.steps == 7
  script = sweep_lib.write_slurm(points, str(tmp_path / "s"), ["--gres=gpu:8"])
  text = pathlib.Path(script).read_text()
  assert "#SBATCH --array=0-1" in text and "#SBATCH --gres=gpu:8" in text
  assert "NCCL_NVLS_ENABLE=0" in text
  lines = (tmp_path / "s" / "points.txt").read_text().splitlines()
  assert lines[1].startswith("python3 -m pn_jax.main --config=configs/pn.py:tiny")
  assert "--config.model.k=4" in lines[1] and "--config.train.steps=7" in lines[1]
  rows = sweep_results.gather(points)
  assert [r["status"] for r in rows] == ["missing", "missing"] and rows[0]["eval_loss"] is None


# Two points, long enough that a signal lands mid-training (60 steps, one metrics row a step);
# they differ in a key that neither their data nor their compiled step depends on, so the second
# reuses the first's data and compilations.
SIGNAL_SWEEP = """
from pn_jax.sweep import product
def get_sweep(arg=None):
  return dict(config="configs/pn.py:tiny", points=product(**{{"data.eval_batches": [1, 2]}}),
              base={{"data.corpus": {corpus!r}, "train.steps": 60, "train.log_every": 1,
                     "train.eval_every": 60, "train.checkpoint_every": 60}})
"""


def _checkpoints(workdir) -> list[int]:
  path = workdir / "checkpoints"
  return sorted(int(p.name) for p in path.iterdir() if p.name.isdigit()) if path.is_dir() else []


def _last_train_step(workdir) -> int:
  """The point's last logged train step (0 before its first; a torn last line is skipped)."""
  rows = metrics.read_rows(str(workdir / "metrics.jsonl"))
  return max((r["step"] for r in rows if r["split"] == "train"), default=0)


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  return True


def _stop_mid_training(args, point_dir, after_step, send, log):
  """Starts the sweep driver (in a process group of its own: the test's stays out), waits for its
  first point to log a step after `after_step`, then `send(driver_pid)`.
  -> (the driver's exit code, the point's pid)."""
  with open(log, "w") as out:
    proc = subprocess.Popen([sys.executable, "-m", "pn_jax.sweep", *args], cwd=REPO, env=_env(),
                            stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
  try:
    deadline = time.monotonic() + 300
    while _last_train_step(point_dir) <= after_step:  # an event: the point's metrics row
      assert proc.poll() is None, f"exited {proc.returncode}:\n{log.read_text()[-3000:]}"
      assert time.monotonic() < deadline, "timed out waiting for the point to train"
      time.sleep(0.05)
    point = json.loads((point_dir / "LOCK").read_text())["pid"]  # the point holds its lock
    send(proc.pid)
    code = proc.wait(timeout=300)
  finally:
    if proc.poll() is None:
      proc.kill()
  if _alive(point):  # an orphan still training: end it (our own child's child) and fail
    os.kill(point, signal.SIGKILL)
    pytest.fail(f"the point (pid {point}) outlived the sweep driver")
  return code, point


def test_sigterm_to_the_driver_stops_the_point_at_a_checkpoint_and_a_rerun_resumes(
    small_corpus, tmp_path):
  """The point outlives neither signal to the driver and saves at both; the sweep exits 143
  without starting the next point; the same command then resumes and completes both points."""
  spec = tmp_path / "signal_sweep.py"
  spec.write_text(SIGNAL_SWEEP.format(corpus=str(small_corpus)))
  root = tmp_path / "sweep"
  first = root / "eval_batches=1"
  args = [f"--sweep={spec}", f"--root={root}", "--mode=local"]
  log = tmp_path / "driver.log"

  # SIGTERM to the driver's pid only (a container's PID 1, `kill PID`)
  code, _ = _stop_mid_training(args, first, 0, lambda pid: os.kill(pid, signal.SIGTERM), log)
  assert code == 128 + signal.SIGTERM, log.read_text()[-3000:]
  saved = _checkpoints(first)
  assert saved and saved[-1] < 60, saved  # the point checkpointed where it stopped
  assert "sweep stopped by SIGTERM" in log.read_text() and "point(s) failed" not in log.read_text()
  assert not (root / "eval_batches=2").exists()  # no point starts after the signal

  # SIGTERM to the driver's whole process group: the point gets it once (twice would make it
  # exit at once, without a new checkpoint)
  code, _ = _stop_mid_training(args, first, saved[-1], lambda pid: os.killpg(pid, signal.SIGTERM),
                               log)
  assert code == 128 + signal.SIGTERM, log.read_text()[-3000:]
  assert _checkpoints(first)[-1] > saved[-1], (_checkpoints(first), saved)

  rerun = _sweep(args)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert "resumed from step" in (first / "sweep.log").read_text()
  assert "data prepared by eval_batches=1 reused" in rerun.stderr
  assert [_checkpoints(root / n)[-1] for n in ("eval_batches=1", "eval_batches=2")] == [60, 60]


def test_gather_on_a_missing_root_is_refused_and_creates_nothing(tmp_path):
  """Issue 25, item 8: `--mode=gather` on a mistyped root exited 0, creating it (with a table of
  `missing` points)."""
  root = tmp_path / "no_such_sweep"
  out = _sweep(["--sweep=configs/sweeps/hkm_tiny.py:steps=2", f"--root={root}", "--mode=gather"])
  assert out.returncode == 2, out.stderr[-3000:]
  errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
  assert errors == [f"error: UsageError: --root={root} is not a directory: nothing to gather; "
                    "pass the --root that --mode=local (or the points' jobs) wrote to"], out.stderr
  assert "Traceback" not in out.stderr and not root.exists() and out.stdout == ""


def _save_step(workdir, step):
  """A real (tiny) orbax checkpoint of `step`: what pretraining writes, minus the model."""
  import types
  import ml_collections
  from pn_jax.train.checkpoint import Checkpointer
  state = types.SimpleNamespace(params={"w": np.zeros(3, np.float32)},
                                opt_state={"m": np.ones(3, np.float32)})
  ckpt = Checkpointer(str(workdir), async_save=False)
  ckpt.save(step, state, ml_collections.ConfigDict({"name": "x"}), force=True)
  ckpt.close()


def test_a_point_is_done_only_when_its_final_checkpoint_is_complete(tmp_path):
  """Issue 25, item 8: a point whose final checkpoint directory was empty counted as done on
  every rerun. Done now means orbax finalized the step, its metadata records the commit, and the
  items a resume restores are there."""
  import shutil
  sweep = dict(config="configs/pn.py:tiny", base={"train.steps": 2},
               points=[{"model.h": 4}])
  (point,) = sweep_lib.expand(sweep, str(tmp_path))
  step_dir = pathlib.Path(point.workdir) / "checkpoints" / "2"
  step_dir.mkdir(parents=True)
  assert not sweep_lib.is_done(point)  # empty
  shutil.rmtree(step_dir)
  _save_step(point.workdir, 2)
  assert sweep_lib.is_done(point)
  shutil.rmtree(step_dir / "params")  # torn: an item a resume restores is gone
  assert not sweep_lib.is_done(point)
  shutil.rmtree(step_dir)
  _save_step(point.workdir, 2)
  (step_dir / "_CHECKPOINT_METADATA").unlink()  # no record of the commit
  assert not sweep_lib.is_done(point)
