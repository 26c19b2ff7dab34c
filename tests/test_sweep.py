"""Sweeps: a 2x2 h/m grid runs end to end on CPU, finished points are skipped, results gathered;
a sweep scored by the specialized model pretrains, specializes and evaluates every point and the
SLM as parts of the comparison experiment, resumes a point killed mid-stage, ranks by validation."""

import csv
import math
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
from pn_jax.config import ConfigError, load_module
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


# --- sweeps scored by the specialized model (pn_jax.sweep_parts) ----------------------------

# Two points of the tiny comparison experiment (cpu_small.py:tiny on the bundled corpus: 16
# pretraining steps, fine-tuning on legal at 4,096 tokens, 8 steps, a checkpoint every 4). They
# differ in the codes' init only, so the second reuses the first's compiled steps (the parts
# share one compilation cache) and the fine-tuning steps are the SLM's.
SPECIALIZED_SWEEP = """
from pn_jax.sweep import product
def get_sweep(arg=None):
  return dict(config="configs/pn.py:tiny", base={"model.m": 2, "model.k": 2, "model.h": 4},
              points=product(**{"model.code_init": ["shared", "random"]}),
              specialize=dict(experiment="configs/experiments/cpu_small.py:tiny", source="tiny"))
"""

# The points' interpreter (--python): the first checkpoint saved under a workdir whose path holds
# $PN_TEST_STALL_IN touches $PN_TEST_MARKER and stalls there, so the test can kill -9 the point
# mid-specialization, at a known step (an event, not a timing).
STALL_FIRST_SAVE = """
import os, runpy, sys, time
from pn_jax.train import checkpoint
save = checkpoint.Checkpointer.save
def stalled(self, *args, **kwargs):
  out = save(self, *args, **kwargs)
  marker = os.environ["PN_TEST_MARKER"]
  if os.environ["PN_TEST_STALL_IN"] in self.directory and not os.path.exists(marker):
    open(marker, "w").close()
    time.sleep(600)
  return out
checkpoint.Checkpointer.save = stalled
assert sys.argv[1:3] == ["-m", "pn_jax.sweep"], sys.argv
sys.argv = [sys.argv[0], *sys.argv[3:]]
runpy.run_module("pn_jax.sweep", run_name="__main__", alter_sys=True)
"""


def _stall_python(tmp_path) -> pathlib.Path:
  script = tmp_path / "stall.py"
  script.write_text(STALL_FIRST_SAVE)
  python = tmp_path / "python"
  python.write_text(f"#!/bin/sh\nexec {sys.executable} {script} \"$@\"\n")
  python.chmod(0o755)
  return python


def test_a_specialized_sweep_scores_every_point_and_resumes_a_point_killed_mid_specialization(
    tmp_path):
  """Pretrain, specialize and evaluate each point and the SLM; a point kill -9'd during its
  fine-tuning is resumed by the rerun from that fine-tuning's checkpoint, its pretraining not
  redone; the table ranks by the specialized model's validation perplexity, test beside it."""
  spec = tmp_path / "specialized_sweep.py"
  spec.write_text(SPECIALIZED_SWEEP)
  root = tmp_path / "sweep"
  args = [f"--sweep={spec}", f"--root={root}", "--mode=local"]
  killed = root / "points" / "code_init=random"
  cell = killed / "specialize" / "code_init_random" / "legal-4096"
  env = {**_env(), "PN_TEST_MARKER": str(tmp_path / "stalled"),
         "PN_TEST_STALL_IN": str(cell)}
  log = tmp_path / "driver.log"
  with open(log, "w") as out:
    proc = subprocess.Popen([sys.executable, "-m", "pn_jax.sweep", *args,
                             f"--python={_stall_python(tmp_path)}"], cwd=REPO, env=env,
                            stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
  try:
    deadline = time.monotonic() + 300
    while not (tmp_path / "stalled").exists():  # the point saved its fine-tuning's step 4
      assert proc.poll() is None, f"exited {proc.returncode}:\n{log.read_text()[-3000:]}"
      assert time.monotonic() < deadline, "timed out waiting for the point to fine-tune"
      time.sleep(0.05)
    point = json.loads((killed / "LOCK").read_text())["pid"]  # the part holds its root's lock
    os.kill(point, signal.SIGKILL)
    code = proc.wait(timeout=300)
  finally:
    if proc.poll() is None:
      proc.kill()
  text = log.read_text()
  assert code == 1 and "error: 1 point(s) failed: code_init=random" in text, text[-3000:]
  assert _checkpoints(cell) == [4]
  recorded = json.loads((killed / "results.json").read_text())
  assert set(recorded["pretrain"]) == {"code_init_random"} and not any(recorded["specialize"].values())
  pretrain_log = (killed / "pretrain" / "code_init_random" / "metrics.jsonl").read_text()
  before = len((killed / "sweep.log").read_text())

  rerun = _sweep(args)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert rerun.stderr.count("done, skipped") == 2 and "prepare:" not in rerun.stderr
  resumed = (killed / "sweep.log").read_text()[before:]  # what the rerun of the point logged
  assert "[2/2] specialize code_init_random on legal at 4.1k tokens" in resumed
  assert "pretrain code_init_random" not in resumed  # recorded: not redone
  assert f"resumed from step 4 in {cell}/checkpoints" in resumed
  assert (killed / "pretrain" / "code_init_random" / "metrics.jsonl").read_text() == pretrain_log

  with open(root / "results.csv") as f:
    rows = list(csv.DictReader(f))
  assert sorted(r["name"] for r in rows) == ["code_init=random", "code_init=shared", "slm"]
  valid = [float(r["valid_ppl"]) for r in rows]
  assert valid == sorted(valid)  # the objective's order
  for r in rows:
    assert r["status"] == "done" and float(r["legal_4.1k_valid"]) == float(r["valid_ppl"])
    assert float(r["test_ppl"]) > 1 and float(r["pretrain_flops"]) > 0
    assert float(r["pretrain_seconds"]) > 0 and int(r["pretrain_steps"]) == 16
  by_name = {r["name"]: r for r in rows}
  shared, slm = by_name["code_init=shared"], by_name["slm"]
  assert float(slm["vs_slm_%"]) == 0.0 and slm["model.code_init"] == ""
  assert int(shared["params"]) > int(slm["params"])  # the PN's shared tensors
  change = 100 * (float(shared["valid_ppl"]) / float(slm["valid_ppl"]) - 1)
  assert float(shared["vs_slm_%"]) == pytest.approx(change, abs=1e-9)
  md = (root / "results.md").read_text()
  assert ("| name | model.code_init | status | valid_ppl | test_ppl | vs_slm_% | vs_slm_test_% |"
          in md and md in rerun.stdout)
  assert (root / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _specialized(**block) -> dict:
  return dict(config="configs/pn.py:tiny", base={"model.m": 2},
              points=sweep_lib.product(**{"model.k": [2], "model.h": [4, 8]}),
              specialize=dict(experiment="configs/experiments/cpu_small.py:tiny", source="tiny",
                              **block))


@pytest.mark.parametrize("sweep, message", [
    (dict(_specialized(), specialize=dict(experiment="configs/experiments/nope.py")),
     r"specialize.experiment: config file 'configs/experiments/nope.py' does not exist"),
    (dict(_specialized(), specialize=dict(source="tiny")),
     r"specialize must be a dict naming its experiment"),
    (_specialized(domains=("legal", "lgal")),
     r"specialize: exp.domains: \['lgal'\] not among the domains of .*: \[.*'legal'"),
    (_specialized(budget=4096), r"specialize.budget: not a setting of .*cpu_small.py:tiny"),
    (_specialized(domains="legal"), r"specialize.domains='legal': Could not override"),
    (_specialized(time_of="h=16"),
     r"specialize.time_of='h=16': .* one of \['k=2,h=4', 'k=2,h=8'\]"),
    (_specialized(reference=("configs/slm.py:tiny",)), r"specialize.reference=.*: expected"),
    (dict(_specialized(), base={"model.m": 8}),
     r"sweep point k=2,h=4: exp.methods.k_2_h_4 \(pretraining config of 'configs/pn.py:tiny'\): "
     r"config.model.m: code length m=8 exceeds basis size h=4"),
    (dict(_specialized(), points=[{"data.domains": ("legal",)}]), r"takes scalar values"),
    (dict(_specialized(), plot={"x": "model.h"}), r"plot.x=.model.h.: .* pretrain_seconds or pretrain_flops"),
])
def test_a_bad_specialize_block_is_a_config_error_naming_it(tmp_path, sweep, message):
  with pytest.raises(ConfigError, match=message):
    sweep_lib.expand(sweep, str(tmp_path / "s"), spec="s.py")
  assert not (tmp_path / "s").exists()


def test_a_specialized_sweep_prepares_once_then_runs_one_unit_per_point(tmp_path):
  """Its points are parts of the experiment (the SLM, the points, the SLM at a point's time);
  print and slurm put the data preparation (step timing included) before them."""
  from pn_jax import experiment, step_costs, sweep_parts
  root = tmp_path / "s"
  points = sweep_lib.expand(_specialized(time_of="k=2,h=8"), str(root), python="python3",
                            spec="s.py")
  assert [p.name for p in points] == ["slm", "k=2,h=4", "k=2,h=8", "slm@k=2,h=8"]
  parts = [p.part for p in points]
  fitted = parts[-1]
  assert fitted.entry == ("configs/slm.py:tiny", "pretrain_scale=time:k_2_h_8")
  assert parts[1].entry == ("configs/pn.py:tiny", "model.m=2,model.k=2,model.h=4")
  assert [list(p.exp.methods) for p in parts] == [["slm"], ["k_2_h_4"], ["k_2_h_8"],
                                                  ["slm_at_k_2_h_8"]]
  assert {p.exp.data_root for p in parts} == {str(root / "data")}
  assert points[2].command == ["python3", "-m", "pn_jax.sweep", "--sweep=s.py", f"--root={root}",
                               "--point=k=2,h=8"]
  timed = sweep_parts.cost_configs(parts)  # what --prepare times: the fit and its target
  assert sorted(timed) == ["slm@k=2,h=8/k_2_h_8", "slm@k=2,h=8/slm_at_k_2_h_8"]

  prepare = sweep_lib.sweep_command("python3", "s.py", str(root), "--prepare")
  script = sweep_lib.write_slurm(points, str(root), ["--gres=gpu:1"])
  first = sweep_lib.write_prepare_job(str(root), prepare, ["--gres=gpu:1"])
  assert sweep_lib.submit_line(script, first) == (
      f"jid=$(sbatch --parsable {root}/prepare.sbatch) && "
      f"sbatch --dependency=afterok:$jid {root}/sweep.sbatch")
  assert (f"srun python3 -m pn_jax.sweep --sweep=s.py --root={root} --prepare"
          in (root / "prepare.sbatch").read_text())
  assert "#SBATCH --array=0-3" in (root / "sweep.sbatch").read_text()
  assert len((root / "points.txt").read_text().splitlines()) == 4

  # Prepared: the tokenizer, and both fitted steps timed on this device.
  assert not sweep_parts.is_prepared(parts)
  (root / "data").mkdir()
  (root / "data" / "tokenizer.model").write_bytes(b"")
  assert not sweep_parts.is_prepared(parts)
  device = step_costs.this_device()
  seconds = {"slm@k=2,h=8/k_2_h_8": 2.0, "slm@k=2,h=8/slm_at_k_2_h_8": 1.0}
  costs = {step_costs.cost_key(c): {"step_seconds": seconds[n], "method": n, "device": device}
           for n, c in timed.items()}
  (root / "data" / "step_costs.json").write_text(json.dumps(costs))
  assert sweep_parts.is_prepared(parts)
  spec, overrides = fitted.entry
  c = experiment.pretrain_config(fitted.exp, spec, overrides, "corpus", "tok", fitted.workdir)
  assert c.train.steps == 2 * points[2].config.train.steps  # the SLM's step is half the PN's


def test_the_specialized_table_ranks_by_validation_and_keeps_unfinished_points(tmp_path):
  """The objective is the macro validation perplexity (over every domain); a point missing a
  cell has none (status partial, ranked after the complete ones), one never run is `missing`."""
  from pn_jax import sweep_scores
  sweep = _specialized(time_of="k=2,h=8", domains=("legal", "religious"))
  points = sweep_lib.expand(sweep, str(tmp_path), spec="s.py")
  pre = lambda s: {"flops": 1e9 * s, "seconds": 9.0, "train_seconds": s, "steps": 16,
                   "generic_valid_ppl": 100.0}
  cell = lambda valid, test: {"best_valid_loss": math.log(valid), "test_ppl": test}
  results = {
      "domain_train_tokens": {"legal": 10**5, "religious": 10**5},
      "pretrain": {"slm": pre(1.0), "k_2_h_4": pre(1.2), "k_2_h_8": pre(1.5),
                   "slm_at_k_2_h_8": pre(1.5)},
      "specialize": {"legal/4096": {"slm": cell(40, 30), "k_2_h_4": cell(15, 40),
                                    "k_2_h_8": cell(10, 10), "slm_at_k_2_h_8": cell(30, 20)},
                     "religious/4096": {"slm": cell(10, 10), "k_2_h_4": cell(15, 40),
                                        "slm_at_k_2_h_8": cell(30, 20)}}}
  rows = sweep_scores.gather(points, results)
  assert [(r["name"], r["status"]) for r in rows] == [
      ("k=2,h=4", "done"), ("slm", "done"), ("slm@k=2,h=8", "done"), ("k=2,h=8", "partial")]
  h4, slm = rows[0], rows[1]
  assert h4["valid_ppl"] == pytest.approx(15.0) and h4["test_ppl"] == pytest.approx(40.0)
  assert slm["valid_ppl"] == pytest.approx(20.0) and h4["vs_slm_%"] == pytest.approx(-25.0)
  assert h4["vs_slm_test_%"] == pytest.approx(100 * (40 / math.sqrt(300) - 1))
  assert h4["vs_slm_time_%"] == pytest.approx(100 * (15 / 30 - 1))
  assert rows[3]["valid_ppl"] is None and rows[3]["legal_4.1k_valid"] == pytest.approx(10.0)
  assert h4["pretrain_seconds"] == 1.2 and h4["pretrain_flops"] == 1.2e9
  paths = sweep_scores.write(rows, points, str(tmp_path), "pretrain_seconds")
  assert [os.path.basename(p) for p in paths] == ["results.csv", "results.md", "results.png"]
  md = (tmp_path / "results.md").read_text()
  assert "| k=2,h=8 | 2 | 8 | partial |  |  |  |  |  | 100.00 | 16 | 1.5 | 1.5e+09 |" in md

  missing = sweep_scores.gather(points, None)  # nothing ran: every row, no figure
  assert {r["status"] for r in missing} == {"missing"}
  assert not sweep_scores.plot(missing, points, str(tmp_path / "none.png"), "pretrain_flops")


def test_every_specialized_sweep_definition_builds_valid_parts(tmp_path, monkeypatch):
  """configs/sweeps/*.py with `specialize`: every part's configs pass the experiment's checks
  (the GPU one's too, here: a typo must not surface on the device), and the GPU sweep is the
  gpu_small miniature at each method's best tested lr, 6 points + 2 SLMs."""
  monkeypatch.chdir(REPO)
  specialized = {}
  for path in sorted((REPO / "configs" / "sweeps").glob("*.py")):
    sweep = sweep_lib.load_sweep(str(path))
    if "specialize" in sweep:
      specialized[path.stem] = sweep_lib.expand(sweep, str(tmp_path / path.stem), spec=str(path))
  assert set(specialized) >= {"hkm_tiny_specialized", "hkm_gpu_small"}
  gpu = specialized["hkm_gpu_small"]
  assert [p.name for p in gpu][::7] == ["slm", "slm@k=32,h=48,m=16"] and len(gpu) == 8
  assert {p.config.train.steps for p in gpu} == {3662}  # 120M tokens of batch 32 x 1,024
  lr = lambda overrides: float(dict(i.split("=") for i in overrides.split(","))["optim.lr"])
  gpu_small = load_module(str(REPO / "configs" / "experiments" / "gpu_small.py"))
  assert gpu[0].config.optim.lr == lr(gpu_small.SLM_TUNED)
  assert {p.config.optim.lr for p in gpu[1:-1]} == {lr(gpu_small.PN_ADOPTED)}
  assert gpu[0].part.exp.budgets == (1_000_000,)
  assert {(p.config.model.d_model, p.config.model.mlp_dim) for p in gpu} == {(128, 512)}
