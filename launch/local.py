"""Runs one command as N cooperating JAX processes on this machine (multi-host rehearsal).

  python launch/local.py --num_processes=2 --cpu_devices=4 -- \
      python -m pn_jax.main --config=configs/pn.py:tiny --workdir=runs/mh

Each process gets JAX_COORDINATOR_ADDRESS (a free localhost port), JAX_NUM_PROCESSES and
JAX_PROCESS_ID, which `pn_jax.parallel.distributed` reads. With --cpu_devices=D every process
runs on D fake CPU devices (global mesh N*D, gloo collectives); with --gpus every process sees
one GPU (CUDA_VISIBLE_DEVICES=i). Output lines are prefixed `[p<i>]`; gloo's `[Gloo] Rank i is
connected to ...` lines (C++, printed whenever a set of devices first runs a collective) are
dropped unless the command asks for library lines (`--log_level=info|debug` or absl's own
`-v`/`--verbosity`, as pn_jax/log_setup.py decides). When one process fails,
the others are terminated and its exit code is returned, so a crash never leaves peers hanging.
A process that exits 143 or 130 stopped on SIGTERM/SIGINT after checkpointing (pn_jax's
StopSignal): its peers stop at the same agreed step by themselves, so they are waited for, not
terminated (a second signal would make them exit without finishing their part of that save).
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import subprocess
import sys
import threading
import time


def free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def device_env(base: dict, *, cpu_devices: int = 0, gpus: list[int] | None = None) -> dict:
  """`base` with the devices one process sees: `cpu_devices` fake CPU devices, or the GPUs
  `gpus` (by CUDA_VISIBLE_DEVICES, NVLink multicast kept off)."""
  env = dict(base)
  if cpu_devices:
    env.update(JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES=str(cpu_devices))
    # The XLA flag would override JAX_NUM_CPU_DEVICES; keep any other XLA flags.
    flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "", env.get("XLA_FLAGS", ""))
    env["XLA_FLAGS"] = flags.strip()
  if gpus is not None:
    env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, gpus))
    env.setdefault("NCCL_NVLS_ENABLE", "0")  # NVLink multicast stays off
  return env


def process_env(i: int, n: int, port: int, *, cpu_devices: int = 0, gpus: bool = False,
                base: dict | None = None) -> dict:
  """Process i of n: its devices (device_env) and where to find the coordinator."""
  env = device_env(os.environ if base is None else base, cpu_devices=cpu_devices,
                   gpus=[i] if gpus else None)
  env.update(JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES=str(n),
             JAX_PROCESS_ID=str(i))
  return env


# Exit codes of a process that stopped on SIGTERM/SIGINT after its checkpoint (128 + signal).
STOPPED_CODES = (143, 130)


GLOO_PREFIX = "[Gloo] "


def shows_library_lines(cmd: list[str]) -> bool:
  """Whether `cmd` runs at a log level that shows libraries' INFO lines (gloo's included):
  --log_level=info|debug, or -v/--verbosity without --log_level (default: concise, hidden)."""
  level = None
  for j, arg in enumerate(cmd):
    if arg.startswith("--log_level="):
      level = arg.split("=", 1)[1]
    elif arg == "--log_level" and j + 1 < len(cmd):
      level = cmd[j + 1]
  if level is None:
    return any(a in ("-v", "--verbosity") or a.startswith(("-v=", "--verbosity=")) for a in cmd)
  return level in ("info", "debug")


def without_gloo(line: str) -> str | None:
  """`line` less gloo's text, which C++ prints wherever the output stands (after a progress
  bar's redraw too, on the bar's line); None where nothing else is left."""
  at = line.find(GLOO_PREFIX)
  if at < 0:
    return line
  return line[:at] + "\n" if line[:at].strip() else None


def _pump(stream, i: int, out, on_line, procs, hide_gloo: bool = False):
  for line in iter(stream.readline, ""):
    if hide_gloo and (line := without_gloo(line)) is None:
      continue
    out.write(f"[p{i}] {line}")
    out.flush()
    if on_line is not None:
      on_line(i, line, procs)
  stream.close()


def launch(cmd: list[str], num_processes: int, *, cpu_devices: int = 0, gpus: bool = False,
           timeout_s: float | None = None, cwd: str | None = None, env: dict | None = None,
           out=None, on_line=None) -> int:
  """Starts the N processes, streams their output, returns the first non-zero exit code (or 0).

  `on_line(i, line, procs)`, if given, sees every output line of process i as it arrives (on that
  process's reader thread), e.g. to signal one process at a given step (preemption_check.py).
  """
  out = sys.stdout if out is None else out
  hide_gloo = not shows_library_lines(cmd)
  port = free_port()
  procs, pumps = [], []
  for i in range(num_processes):
    p = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True, bufsize=1,
                         env=process_env(i, num_processes, port, cpu_devices=cpu_devices,
                                         gpus=gpus, base=env))
    procs.append(p)
    t = threading.Thread(target=_pump, args=(p.stdout, i, out, on_line, procs, hide_gloo),
                         daemon=True)
    t.start()
    pumps.append(t)
  deadline = None if timeout_s is None else time.time() + timeout_s
  code = 0
  try:
    while [p.poll() for p in procs].count(None):  # poll every process, every time
      failed = [p.returncode for p in procs
                if p.returncode not in (None, 0) and p.returncode not in STOPPED_CODES]
      if failed or (deadline is not None and time.time() > deadline):
        code = failed[0] if failed else 124
        out.write(f"[launch] {'a process exited with ' + str(code) if failed else 'timeout'}: "
                  "terminating the others\n")
        break
      time.sleep(0.2)
  finally:
    for p in procs:  # only the processes we started, by handle
      if p.poll() is None:
        p.terminate()
    for p in procs:
      try:
        p.wait(timeout=30)
      except subprocess.TimeoutExpired:
        p.kill()
        p.wait()
    for t in pumps:
      t.join(timeout=5)
  if code == 0:
    code = next((p.returncode for p in procs if p.returncode != 0), 0)
  return code


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--num_processes", type=int, default=2)
  parser.add_argument("--cpu_devices", type=int, default=0,
                      help="fake CPU devices per process (0: use the real platform)")
  parser.add_argument("--gpus", action="store_true", help="one GPU per process")
  parser.add_argument("--timeout_s", type=float, default=None)
  parser.add_argument("cmd", nargs=argparse.REMAINDER, help="-- command to run in each process")
  args = parser.parse_args(argv)
  cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
  if not cmd:
    parser.error("give the command after --, e.g. -- python -m pn_jax.main --config=...")
  if args.num_processes < 1:
    parser.error("--num_processes must be >= 1")
  return launch(cmd, args.num_processes, cpu_devices=args.cpu_devices, gpus=args.gpus,
                timeout_s=args.timeout_s)


if __name__ == "__main__":
  sys.exit(main())
