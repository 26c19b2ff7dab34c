"""Multi-host: 2 processes x 4 CPU devices train, checkpoint, restart and resume exactly like one
process with 8 devices (jax.distributed + gloo on localhost, started by launch/local.py)."""

import io
import json
import os
import pathlib
import shutil
import sys
import time

import jax
import numpy as np
import pytest

from conftest import REPO, load_config, write_small_corpus
from pn_jax.data import pipeline
from pn_jax.modes.pretrain import pretrain
from pn_jax.parallel import distributed

sys.path.insert(0, str(REPO / "launch"))
import local as local_launch  # noqa: E402  launch/local.py

STEPS, STOP = 6, 3


FAST_XLA = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def tiny_config(corpus):
  config = load_config("pn")
  config.data.corpus = str(corpus)
  config.train.update(steps=STEPS, log_every=1, progress_bar=False)
  return config


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  """(workdir, corpus): a ~200 KB slice of the bundled corpus, prepared once."""
  corpus = write_small_corpus(tmp_path_factory.mktemp("corpus"))
  workdir = tmp_path_factory.mktemp("prepared")
  pipeline.prepare_run_data(tiny_config(corpus), str(workdir))
  return workdir, corpus


def rows(workdir, split):
  lines = pathlib.Path(workdir, "metrics.jsonl").read_text().splitlines()
  return [r for r in map(json.loads, lines) if r["split"] == split]


def test_two_processes_resume_equals_one_process(prepared, tmp_path):
  prepared, corpus = prepared
  # Reference: this pytest process, 8 fake devices, straight through.
  ref = tmp_path / "ref"
  shutil.copytree(prepared, ref)
  assert jax.device_count() == 8
  t0 = time.time()
  pretrain(tiny_config(corpus), str(ref))
  timings = {"reference": time.time() - t0}

  # 2 processes x 4 devices: stop (checkpoint) at STOP, restart both, resume to STEPS.
  work = tmp_path / "mh"
  shutil.copytree(prepared, work)
  cmd = [sys.executable, "-m", "pn_jax.main", "--config=configs/pn.py:tiny", f"--workdir={work}",
         f"--config.data.corpus={corpus}", f"--config.train.steps={STEPS}",
         "--config.train.log_every=1", "--config.train.progress_bar=false",
         "--distributed_init_timeout_s=60", "--distributed_shutdown_timeout_s=60"]
  env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax_cache"),
         "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
         "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
         "XLA_FLAGS": FAST_XLA}  # launch/local.py gives each process 4 CPU devices
  logs = []
  for extra in ([f"--config.train.stop_at_step={STOP}"], []):
    out, t0 = io.StringIO(), time.time()
    code = local_launch.launch(cmd + extra, 2, cpu_devices=4, timeout_s=240, cwd=str(REPO),
                               env=env, out=out)
    logs.append(out.getvalue())
    timings[f"phase {len(logs)}"] = time.time() - t0
    assert code == 0, f"exit {code} after {time.time() - t0:.0f} s:\n{logs[-1][-4000:]}"
  print("timings (s):", {k: round(v, 1) for k, v in timings.items()})

  first, second = logs
  assert "[Gloo]" not in first + second  # gloo's connection lines: only at --log_level=info
  for p in (0, 1):
    assert f"process {p}/2, 4 local cpu devices of 8" in first
    assert f"[p{p}]" in second and f"resumed from step {STOP}" in "\n".join(
        line for line in second.splitlines() if line.startswith(f"[p{p}]"))
  assert sorted(os.listdir(work / "checkpoints")) == [str(STOP), str(STEPS)]
  data_state = sorted(os.listdir(work / "checkpoints" / str(STEPS) / "data"))
  assert "process_0-of-2.json" in data_state and "process_1-of-2.json" in data_state

  # Process 0 alone logs: one row per step, continuing across the restart.
  multi, single = rows(work, "train"), rows(ref, "train")
  assert [r["step"] for r in multi] == list(range(1, STEPS + 1))
  np.testing.assert_allclose([r["loss"] for r in multi], [r["loss"] for r in single], rtol=2e-5)
  np.testing.assert_allclose([r["grad_norm"] for r in multi], [r["grad_norm"] for r in single],
                             rtol=2e-4)
  (ev_multi,), (ev_single,) = rows(work, "eval"), rows(ref, "eval")
  np.testing.assert_allclose(ev_multi["loss"], ev_single["loss"], rtol=2e-5)


def test_resolve_reads_flags_env_and_cluster():
  assert distributed.resolve("auto", env={}) is None
  assert distributed.resolve("off", coordinator_address="h:1", env={}) is None
  env = {"JAX_COORDINATOR_ADDRESS": "h0:1234", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "2"}
  assert distributed.resolve("auto", env=env) == dict(
      coordinator_address="h0:1234", num_processes=4, process_id=2, local_device_ids=None)
  # Flags win over the environment.
  assert distributed.resolve("auto", num_processes=2, process_id=1, env=env)["num_processes"] == 2
  # A multi-task SLURM step is detected; JAX fills in the rest (None here).
  slurm = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "n[1-2]", "SLURM_NTASKS": "2"}
  assert distributed.detected_cluster(slurm) == "slurm"
  assert distributed.resolve("auto", env=slurm) == dict(
      coordinator_address=None, num_processes=None, process_id=None, local_device_ids=None)
  assert distributed.resolve("auto", env={**slurm, "SLURM_NTASKS": "1"}) is None
  assert distributed.detected_cluster({"TPU_WORKER_HOSTNAMES": "a,b"}) == "tpu"
  assert distributed.resolve("on", env={})["coordinator_address"] is None
  with pytest.raises(ValueError, match="process_id=3 is outside"):
    distributed.resolve("auto", num_processes=2, process_id=3, env={})
  with pytest.raises(ValueError, match="JAX_NUM_PROCESSES='two'"):
    distributed.resolve("auto", env={"JAX_NUM_PROCESSES": "two"})


def test_data_shard_is_the_block_this_process_holds():
  from pn_jax.parallel import mesh as mesh_lib
  config = load_config("pn")
  config.mesh.update(data=2, fsdp=2, tensor=2)
  # One process holds every row whatever the mesh.
  assert distributed.data_shard(mesh_lib.make_mesh(config), 8) == {"process_index": 0,
                                                                   "process_count": 1}
  block = lambda rows: distributed.row_block(np.asarray(rows), 8)
  assert block([4, 5, 6, 7]) == {"process_index": 1, "process_count": 2}
  assert block([2, 3]) == {"process_index": 1, "process_count": 4}
  assert block(range(8)) == {"process_index": 0, "process_count": 1}  # batch replicated
  with pytest.raises(ValueError, match="not one contiguous equal block"):
    block([0, 1, 4, 5])
  with pytest.raises(ValueError, match="not one contiguous equal block"):
    block([1, 2])


def test_launcher_drops_gloo_lines_unless_the_command_shows_library_lines():
  """gloo prints `[Gloo] Rank i is connected to ...` from C++ (no log level of its own): the
  launcher drops those lines, unless the command runs at --log_level=info|debug or with -v."""
  code = ("import sys\n"
          "print('[Gloo] Rank 0 is connected to 1 peer ranks. Expected number of connected peer "
          "ranks is : 1', flush=True)\nprint('own line', flush=True)\n"
          # after a progress bar's redraw (no newline), gloo's text lands on the bar's line
          "print('bar 1/4', end='', flush=True)\n"
          "print('[Gloo] Rank 1 is connected to 1 peer ranks.', flush=True)\n")
  for extra, gloo_shown in (([], False), (["--log_level=concise"], False),
                            (["--log_level=warning"], False), (["--log_level=info"], True),
                            (["--log_level", "debug"], True), (["-v", "1"], True),
                            (["-v", "1", "--log_level=concise"], False)):
    out = io.StringIO()
    assert local_launch.launch([sys.executable, "-c", code, *extra], 2, cpu_devices=1,
                               out=out) == 0
    text = out.getvalue()
    assert ("[p0] [Gloo] Rank 0" in text and "[p1] [Gloo] Rank 0" in text) is gloo_shown, extra
    assert ("[Gloo] Rank 1" in text) is gloo_shown, text
    assert "[p0] own line" in text and "[p1] own line" in text, text
    assert "[p0] bar 1/4" in text and "[p1] bar 1/4" in text, text


def test_launcher_stops_all_when_one_fails():
  """One failed process ends the launch with its code; the others are terminated, not waited."""
  code = ("import os, sys, time\n"
          "assert os.environ['JAX_NUM_PROCESSES'] == '3' and os.environ['JAX_NUM_CPU_DEVICES'] == '2'\n"
          "assert 'xla_force_host_platform_device_count' not in os.environ.get('XLA_FLAGS', '')\n"
          "print('coordinator', os.environ['JAX_COORDINATOR_ADDRESS'], flush=True)\n"
          # p1 fails after the others have had time to start (and print), then all must stop.
          "(time.sleep(5), sys.exit(3)) if os.environ['JAX_PROCESS_ID'] == '1' else time.sleep(120)\n")
  out, t0 = io.StringIO(), time.time()
  rc = local_launch.launch([sys.executable, "-c", code], 3, cpu_devices=2, out=out)
  assert rc == 3 and time.time() - t0 < 60, out.getvalue()
  text = out.getvalue()
  assert all(f"[p{i}] coordinator localhost:" in text for i in range(3))
  assert "a process exited with 3: terminating the others" in text


def test_preemption_check_sigterm_to_one_process_then_resume(prepared, tmp_path, monkeypatch):
  """launch/preemption_check.py, the two-GPU rehearsal of docs/benchmarks.md, on CPU devices:
  a preemption notice reaching one process only (as when a scheduler signals one node first)
  stops every process at one agreed step with exit 143 and one checkpoint; the restarted job
  resumes from it and its loss curve equals one process driving all 8 devices."""
  sys.path.insert(0, str(REPO / "launch"))
  import preemption_check
  _, corpus = prepared
  monkeypatch.setenv("XLA_FLAGS", FAST_XLA)
  monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "jax_cache"))
  monkeypatch.chdir(REPO)
  out = io.StringIO()
  code = preemption_check.main(
      ["--cpu_devices=4", "--steps=6", "--signal_at_step=2", f"--workdir={tmp_path / 'pc'}",
       "--timeout_s=240", "--", "--config=configs/pn.py:tiny", f"--config.data.corpus={corpus}"],
      out=out)
  result = json.loads(out.getvalue().splitlines()[-1])
  assert code == 0 and result["ok"], out.getvalue()[-3000:]
  stop = result["stopped_at"]
  assert 2 <= stop < 6 and result["checkpoints"] == [stop, 6]
  assert result["max_rel_loss_diff"] < 1e-5  # float32 on CPU: equal up to reduction order
  preempted = (tmp_path / "pc" / "preempted.log").read_text()
  for p in (0, 1):  # each process printed its own result: stopped at the same step by SIGTERM
    (line,) = [l for l in preempted.splitlines() if l.startswith(f'[p{p}] {{"mode"')]
    assert json.loads(line.split("] ", 1)[1])["stop_reason"] == "SIGTERM"


def test_launcher_waits_for_the_peers_of_a_process_that_stopped_on_a_signal(tmp_path):
  """Exit 143 means "checkpointed and stopped on SIGTERM": the peers stop at the same agreed step
  by themselves, so the launcher waits for them instead of terminating them mid-save."""
  flag = "import os, sys, pathlib, time\nf = pathlib.Path(os.environ['PC_FILE'])\n"
  code = (flag +
          "if os.environ['JAX_PROCESS_ID'] == '1':\n"
          "  t = f.with_suffix('.tmp'); t.write_text(str(os.getpid())); t.rename(f); sys.exit(143)\n"
          "while not f.exists(): time.sleep(0.01)\n"
          "pid = int(f.read_text())\n"
          "while True:\n"  # until the launcher has reaped process 1 (its pid is gone)
          "  try: os.kill(pid, 0)\n"
          "  except ProcessLookupError: break\n"
          "  time.sleep(0.01)\n"
          "print('p0 saved its part', flush=True); sys.exit(143)\n")
  out = io.StringIO()
  rc = local_launch.launch([sys.executable, "-c", code], 2, cpu_devices=1, out=out,
                           env={**os.environ, "PC_FILE": str(tmp_path / "pid")}, timeout_s=120)
  assert rc == 143 and "[p0] p0 saved its part" in out.getvalue(), out.getvalue()
