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


def test_sigterm_to_one_process_stops_every_process_at_one_checkpoint(prepared, tmp_path):
  """A preemption notice reaching one process only (as on a multi-host job whose scheduler
  signals one node first): every process stops at the same agreed step, the checkpoint of that
  step is written by all of them, and every process exits 143 so the job is seen unfinished."""
  import signal
  import subprocess
  import threading
  prepared, corpus = prepared
  work = tmp_path / "mh"
  shutil.copytree(prepared, work)
  cmd = [sys.executable, "-m", "pn_jax.main", "--config=configs/pn.py:tiny", f"--workdir={work}",
         f"--config.data.corpus={corpus}", "--config.train.steps=100000",
         "--config.train.log_every=1", "--config.train.checkpoint_every=100000",
         "--config.train.eval_every=100000", "--config.train.progress_bar=false"]
  env = {**os.environ, "XLA_FLAGS": FAST_XLA,
         "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax_cache")}
  port = local_launch.free_port()
  procs, logs, readers = [], [[], []], []
  for i in range(2):
    procs.append(subprocess.Popen(
        cmd, cwd=str(REPO), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env=local_launch.process_env(i, 2, port, cpu_devices=4, base=env)))
    readers.append(threading.Thread(target=lambda p=procs[-1], log=logs[i]: log.extend(p.stdout),
                                    daemon=True))
    readers[-1].start()
  try:
    deadline = time.time() + 240
    while not any("[train] step 3 " in line for line in logs[0]):
      assert time.time() < deadline and procs[0].poll() is None, "".join(logs[0][-30:])
      time.sleep(0.2)
    procs[0].send_signal(signal.SIGTERM)  # process 0 only
    codes = [p.wait(timeout=120) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for reader in readers:  # the last lines (the result JSON) may still be in the pipe
    reader.join(timeout=30)
  assert codes == [143, 143], "".join(logs[1][-30:])
  results = [json.loads(next(l for l in reversed(log) if l.startswith('{"mode"')))
             for log in logs]
  stopped = {r["stopped_at"] for r in results}
  assert len(stopped) == 1 and {r["stop_reason"] for r in results} == {"SIGTERM"}
  assert os.listdir(work / "checkpoints") == [str(stopped.pop())]
