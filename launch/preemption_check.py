"""Preemption rehearsal: N processes pretrain, one of them gets SIGTERM mid-run, all resume, and
the loss curve must match one process driving all the devices.

  python launch/preemption_check.py --gpus --workdir=/tmp/pc -- \
      --config=configs/pn.py
  python launch/preemption_check.py --cpu_devices=4 --steps=6 --workdir=/tmp/pc -- \
      --config=configs/pn.py:tiny        (no accelerator)

Three runs of `python -m pn_jax.main` (pretraining) on the same prepared data:
  1. reference: one process with all N devices (N GPUs, or N * cpu_devices CPU devices),
     straight through to --steps;
  2. N processes started by launch/local.py, one GPU (--gpus) or --cpu_devices each; once
     process 0 has logged step --signal_at_step, process --signal_process alone gets SIGTERM.
     Every process must stop at one agreed step, exit 143 and leave exactly that checkpoint;
  3. the same N processes again: each must log "resumed from step <that step>" and finish.
Prints one JSON line (the stop step, both loss curves, the largest relative difference, `ok`)
and exits 0 iff every check held and the curves agree within --rtol. The default tolerance is
two bf16 ulps (2**-7): the runs compute in bf16, and 1 process x N devices and N processes x 1
device reduce the same numbers in a different order.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import threading

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import local  # noqa: E402  launch/local.py

REPO = pathlib.Path(__file__).resolve().parent.parent
STEP_LINE = re.compile(r"\[train\] step (\d+) ")
RESUMED = re.compile(r"resumed from step (\d+)")


def main_cmd(workdir: pathlib.Path, run_args: list[str], steps: int) -> list[str]:
  """Every step logged (the curves compared), no progress bar (the logs are files)."""
  return [sys.executable, "-m", "pn_jax.main", *run_args, f"--workdir={workdir}",
          f"--config.train.steps={steps}", "--config.train.log_every=1",
          "--config.train.progress_bar=false"]


def reference_env(n: int, *, cpu_devices: int, gpus: bool) -> dict:
  """One process, every device: N GPUs, or N * cpu_devices fake CPU devices."""
  env = {k: v for k, v in os.environ.items()
         if k not in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")}
  return local.device_env(env, cpu_devices=n * cpu_devices,
                          gpus=list(range(n)) if gpus else None)


def train_losses(workdir: pathlib.Path) -> dict[int, float]:
  """step -> train loss, from the run's metrics.jsonl (process 0 writes it; {} without one)."""
  from pn_jax.train import metrics
  rows = metrics.read_rows(str(workdir / metrics.LOG))
  return {r["step"]: r["loss"] for r in rows if r["split"] == "train"}


class SignalAtStep:
  """`on_line` for local.launch: SIGTERM to process `target` once process 0 logs step `step`."""

  def __init__(self, step: int, target: int):
    self.step, self.target = step, target
    self.sent = threading.Event()

  def __call__(self, i: int, line: str, procs) -> None:
    found = STEP_LINE.search(line)
    if i == 0 and found and int(found.group(1)) >= self.step and not self.sent.is_set():
      self.sent.set()
      procs[self.target].send_signal(signal.SIGTERM)


def run_reference(args, run_args, out) -> tuple[int, pathlib.Path]:
  """Run 1: one process, every device, straight through -> (exit code, workdir)."""
  workdir = pathlib.Path(args.workdir, "reference")
  env = reference_env(args.num_processes, cpu_devices=args.cpu_devices, gpus=args.gpus)
  with open(pathlib.Path(args.workdir, "reference.log"), "w") as log:
    code = subprocess.call(main_cmd(workdir, run_args, args.steps), cwd=REPO, env=env, stdout=log,
                           stderr=subprocess.STDOUT, timeout=args.timeout_s)
  out.write(f"[check] reference run exited {code} (log: {args.workdir}/reference.log)\n")
  return code, workdir


def run_preempted(args, run_args, out) -> dict:
  """Runs 2 and 3 above; what each showed."""
  from pn_jax.data import pipeline
  workdir = pathlib.Path(args.workdir, "multiprocess")
  pipeline.copy_prepared(str(pathlib.Path(args.workdir, "reference")), str(workdir))
  launch = lambda on_line, log: local.launch(
      main_cmd(workdir, run_args, args.steps), args.num_processes, cpu_devices=args.cpu_devices,
      gpus=args.gpus, timeout_s=args.timeout_s, cwd=str(REPO), out=log, on_line=on_line)
  signal_at = SignalAtStep(args.signal_at_step, args.signal_process)
  codes, texts = [], []
  for phase, on_line in (("preempted", signal_at), ("resumed", None)):
    path = pathlib.Path(args.workdir, f"{phase}.log")
    with open(path, "w") as log:
      codes.append(launch(on_line, log))
    texts.append(path.read_text())
    out.write(f"[check] {phase} run exited {codes[-1]} (log: {path})\n")
  checkpoints = sorted(int(s) for s in os.listdir(workdir / "checkpoints") if s.isdigit()) \
      if (workdir / "checkpoints").is_dir() else []
  resumed = {int(m.group(1)) for m in RESUMED.finditer(texts[1])}
  stops = [json.loads(line.split("] ", 1)[1]).get("stopped_at") for line in texts[0].splitlines()
           if '] {"mode"' in line]
  return {"workdir": workdir, "signal_sent": signal_at.sent.is_set(), "codes": codes,
          "stopped_at": stops, "resumed_from": sorted(resumed), "checkpoints": checkpoints}


def verdict(args, ref_code: int, ref_dir: pathlib.Path, mp: dict, steps: int) -> dict:
  """The JSON result: every check by name, the curves and their largest relative gap."""
  ref = train_losses(ref_dir) if ref_code == 0 else {}
  multi = train_losses(mp["workdir"])
  stop = mp["stopped_at"][0] if mp["stopped_at"] else None
  common = sorted(set(ref) & set(multi))
  gaps = [abs(multi[s] - ref[s]) / max(abs(ref[s]), 1e-12) for s in common]
  checks = {
      "reference_finished": ref_code == 0 and sorted(ref) == list(range(1, steps + 1)),
      "signal_sent": mp["signal_sent"],
      "all_stopped_with_143": mp["codes"][0] == 143 and len(mp["stopped_at"]) == args.num_processes,
      "one_agreed_stop_step": len(set(mp["stopped_at"])) == 1 and stop is not None and stop < steps,
      "resumed_from_stop_step": mp["resumed_from"] == ([stop] if stop is not None else []),
      "resumed_run_finished": mp["codes"][1] == 0 and sorted(multi) == list(range(1, steps + 1)),
      "losses_within_rtol": bool(gaps) and len(common) == steps and max(gaps) <= args.rtol,
  }
  return {"ok": all(checks.values()), "checks": checks, "stopped_at": stop,
          "checkpoints": mp["checkpoints"], "max_rel_loss_diff": max(gaps) if gaps else None,
          "rtol": args.rtol, "steps": steps, "num_processes": args.num_processes,
          "devices": "gpu" if args.gpus else f"{args.cpu_devices} cpu per process",
          "loss_reference": [ref[s] for s in common], "loss_preempted": [multi[s] for s in common]}


def parse(argv):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--num_processes", type=int, default=2)
  p.add_argument("--gpus", action="store_true", help="one GPU per process (N GPUs in all)")
  p.add_argument("--cpu_devices", type=int, default=0, help="fake CPU devices per process")
  p.add_argument("--workdir", required=True, help="new directory for the three runs")
  p.add_argument("--steps", type=int, default=100, help="config.train.steps of every run")
  p.add_argument("--signal_at_step", type=int, default=40)
  p.add_argument("--signal_process", type=int, default=1, help="the process that gets SIGTERM")
  p.add_argument("--rtol", type=float, default=2.0 ** -7)
  p.add_argument("--timeout_s", type=float, default=600)
  p.add_argument("run_args", nargs=argparse.REMAINDER, help="-- pn_jax.main flags (--config=...)")
  args = p.parse_args(argv)
  args.run_args = args.run_args[1:] if args.run_args[:1] == ["--"] else args.run_args
  if args.gpus == bool(args.cpu_devices):
    p.error("give exactly one of --gpus and --cpu_devices=D")
  if not any(a.startswith("--config=") for a in args.run_args):
    p.error("give the run after --, e.g. -- --config=configs/pn.py:tiny")
  if not 0 < args.signal_at_step < args.steps:
    p.error("--signal_at_step must be in (0, --steps)")
  if not 0 <= args.signal_process < args.num_processes:
    p.error(f"--signal_process must be in [0, {args.num_processes})")
  if os.path.exists(args.workdir) and os.listdir(args.workdir):
    p.error(f"--workdir {args.workdir} is not empty; give a new directory")
  return args


def main(argv=None, out=None) -> int:
  out = sys.stdout if out is None else out
  args = parse(argv)
  os.makedirs(args.workdir, exist_ok=True)
  steps = args.steps
  ref_code, ref_dir = run_reference(args, args.run_args, out)
  if ref_code != 0:
    out.write(json.dumps({"ok": False, "error": f"reference run exited {ref_code}"}) + "\n")
    return 1
  result = verdict(args, ref_code, ref_dir, run_preempted(args, args.run_args, out), steps)
  out.write(json.dumps(result) + "\n")
  return 0 if result["ok"] else 1


if __name__ == "__main__":
  sys.exit(main())
