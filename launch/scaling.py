"""Data-parallel scaling of the train step: `pn_jax.bench` on 1 device and on N devices.

  python launch/scaling.py --devices=2 --per_device_batch=32 -- --config=configs/bench/gpt2_dense.py
  python launch/scaling.py --devices=2 --per_device_batch=32 -- --config=configs/bench/gpt2_pn.py \
      --config.data.cluster_batching=mixed
  python launch/scaling.py --platform=cpu --devices=2 --per_device_batch=2 -- \
      --config=configs/bench/gpt2_dense.py:tiny        (a rehearsal without GPUs)

Each measurement is its own `python -m pn_jax.bench` process that sees only its devices (GPUs by
CUDA_VISIBLE_DEVICES, or that many fake CPU devices), so its peak memory and compile are its
own: one device with a batch of `per_device_batch`, then N devices with N times that batch on
each mesh of --meshes (`data`: mesh data=N; `fsdp`: mesh fsdp=N, parameters and optimizer state
sharded). Weak scaling, as a user adding GPUs would run it. Prints every bench JSON line, then one
line per mesh: {"scaling": ..., "efficiency": tokens/s on N / (N x tokens/s on 1),
"collective_bytes_n": {all-reduce: bytes per step and device, ...} of the N-device step}.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import local  # noqa: E402  launch/local.py

MESHES = {"data": dict(data=-1, fsdp=1, tensor=1), "fsdp": dict(data=1, fsdp=-1, tensor=1)}


def bench_env(devices: int, platform: str) -> dict:
  """The environment of a bench process that sees `devices` GPUs or fake CPU devices."""
  gpu = platform == "gpu"
  return local.device_env(dict(os.environ, PYTHONUNBUFFERED="1"),
                          cpu_devices=0 if gpu else devices,
                          gpus=list(range(devices)) if gpu else None)


def bench(bench_args: list[str], devices: int, batch: int, mesh: dict, platform: str,
          timeout_s: float) -> dict:
  """One bench process -> its JSON record (raises with the output tail if it printed none)."""
  cmd = [sys.executable, "-m", "pn_jax.bench", *bench_args, f"--config.data.batch_size={batch}",
         *(f"--config.mesh.{axis}={size}" for axis, size in mesh.items())]
  proc = subprocess.run(cmd, env=bench_env(devices, platform), capture_output=True, text=True,
                        timeout=timeout_s)
  records = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith('{"config"')]
  if proc.returncode or not records:
    raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode} with no bench record:\n"
                       f"{(proc.stdout + proc.stderr)[-3000:]}")
  return records[0]


def scaling_line(one: dict, many: dict, devices: int, mesh: str) -> dict:
  return {"scaling": one["config"], "mesh": f"{mesh}={devices}", "devices": devices,
          "batch_1": one["batch"], "batch_n": many["batch"],
          "tokens_per_s_1": one["tokens_per_s"], "tokens_per_s_n": many["tokens_per_s"],
          "step_time_s_1": one["step_time_s"], "step_time_s_n": many["step_time_s"],
          "efficiency": many["tokens_per_s"] / (devices * one["tokens_per_s"]),
          # what the N devices exchange per step and device (the compiled step's collectives)
          "collective_bytes_n": many["collective_bytes"],
          "device_kind": many["device_kind"]}


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--devices", type=int, default=2, help="N")
  p.add_argument("--per_device_batch", type=int, default=32)
  p.add_argument("--meshes", default="data,fsdp", help=f"comma-separated, of {sorted(MESHES)}")
  p.add_argument("--platform", choices=("gpu", "cpu"), default="gpu")
  p.add_argument("--timeout_s", type=float, default=600)
  p.add_argument("bench_args", nargs=argparse.REMAINDER, help="-- pn_jax.bench flags")
  args = p.parse_args(argv)
  bench_args = args.bench_args[1:] if args.bench_args[:1] == ["--"] else args.bench_args
  meshes = args.meshes.split(",")
  if unknown := [m for m in meshes if m not in MESHES]:
    p.error(f"--meshes: unknown {unknown}; choose from {sorted(MESHES)}")
  if args.devices < 2 or not any(a.startswith("--config=") for a in bench_args):
    p.error("give --devices >= 2 and the bench config after --, e.g. -- --config=...")
  run = lambda n, mesh: bench(bench_args, n, n * args.per_device_batch, MESHES[mesh],
                              args.platform, args.timeout_s)
  one = run(1, "data")
  print(json.dumps(one), flush=True)
  summary = []
  for mesh in meshes:
    many = run(args.devices, mesh)
    print(json.dumps(many), flush=True)
    summary.append(scaling_line(one, many, args.devices, mesh))
  for line in summary:
    print(json.dumps(line), flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
