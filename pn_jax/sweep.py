"""Sweeps: a definition file -> one pretraining run per point -> one results table and plot.

  python -m pn_jax.sweep --sweep=configs/sweeps/hkm_tiny.py --root=runs/sweep --mode=local

A definition (configs/sweeps/*.py, big_vision style) has `get_sweep(arg) -> dict` with
  config      the base run config, as given to pn_jax.main ("configs/pn.py:tiny");
  points      a list of override dicts {"model.h": 8, "train.steps": 40}, e.g. `product(...)`;
  base        (optional) overrides shared by every point;
  plot        (optional) {"x": key, "y": metric} for the figure;
  specialize  (optional) score every point by its specialized model instead: each point is
              pretrained, specialized on an experiment's domains and budgets and evaluated by
              the comparison experiment's stages, next to a reference SLM (pn_jax.sweep_parts;
              the table and figure: pn_jax.sweep_scores; plot.x: pretrain_seconds or
              pretrain_flops).
Each point runs in <root>/<name> (name from its overrides, e.g. `h=8,m=4`; with specialize,
<root>/points/<name> on the data prepared once in <root>/data). Modes:
  local   runs every unfinished point in turn (`python -m pn_jax.main` subprocesses; points with
          the same data settings share one tokenizer/clustering; a bar follows the running
          point's steps, with its ETA), then gathers; with specialize, prepares the data first;
  print   one command line per unfinished point (feed them to launch/tpu_vm.sh, xpk, a queue);
          with specialize, the first line prepares the data and must finish before the others;
  slurm   writes <root>/points.txt and <root>/sweep.sbatch (one array task per unfinished point;
          with specialize, a prepare.sbatch job that the array waits for);
  gather  only collects results: <root>/results.{csv,md,png}.
With specialize, `--prepare` (the data preparation) and `--point=<name>` (one point) run one unit
in this process: what local mode starts and the lines of print and slurm run.
A point is finished when its workdir holds a complete checkpoint of its last step (train.steps:
finalized by orbax, with its metadata and items), or with specialize when its results.json
records every stage, so a re-run (after a crash, or with more points) does only what is missing
(a point stopped mid-specialization resumes its stage; finished stages are not redone).
`gather` refuses a --root that does not exist. SIGTERM/SIGINT to a local sweep is passed on to
the running point, which checkpoints and exits; the sweep then exits 143/130 and the same command
resumes it (PointSignals).
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import shlex
import signal
import subprocess
import sys
import threading
import time

import ml_collections

from pn_jax import config_overrides
from pn_jax.config import ConfigError, load_config, load_module, validate


def product(**axes) -> list[dict]:
  """Grid: product(**{"model.h": [4, 8], "model.m": [2, 4]}) -> 4 override dicts."""
  keys = list(axes)
  return [dict(zip(keys, values)) for values in itertools.product(*axes.values())]


@dataclasses.dataclass
class Point:
  name: str
  overrides: dict  # the point's own keys (table columns)
  config: ml_collections.ConfigDict  # resolved: base config + base overrides + point overrides
  workdir: str
  command: list[str]
  part: "sweep_parts.Part | None" = None  # scored by the specialized model: its experiment part


def load_sweep(spec: str) -> dict:
  path, _, arg = spec.partition(":")
  module = load_module(path, "sweep")
  if not hasattr(module, "get_sweep"):
    raise ConfigError(f"sweep file {path!r} has no get_sweep(arg) function")
  sweep = module.get_sweep(arg or None)
  for key in ("config", "points"):
    if key not in sweep:
      raise ConfigError(f"sweep {path!r}: get_sweep() must return a dict with {key!r}")
  if not sweep["points"]:
    raise ConfigError(f"sweep {path!r} has no points")
  return sweep


def point_name(overrides: dict) -> str:
  """{'model.h': 8, 'model.m': 4} -> 'h=8,m=4' (full keys where the last parts collide)."""
  short = [k.rsplit(".", 1)[-1] for k in overrides]
  keys = short if len(set(short)) == len(short) else list(overrides)
  return ",".join(f"{k}={_fmt(v)}" for k, v in zip(keys, overrides.values())) or "base"


def _fmt(value) -> str:
  return f"{value:g}" if isinstance(value, float) else str(value)


def _named(sweep: dict) -> list[tuple[str, dict, dict]]:
  """(name, own overrides, base + own overrides) of each point; names are unique."""
  base = dict(sweep.get("base", {}))
  out, names = [], set()
  for overrides in sweep["points"]:
    name = point_name(overrides)
    if name in names:
      raise ConfigError(f"sweep has two points named {name!r}")
    names.add(name)
    out.append((name, dict(overrides), {**base, **overrides}))
  return out


def expand(sweep: dict, root: str, *, python: str = sys.executable,
           extra_args: tuple[str, ...] = (), spec: str = "") -> list[Point]:
  """One Point per override dict; every point's config is validated before anything runs. A
  sweep with `specialize` (`spec`: its definition, for the points' commands) has one Point per
  part (sweep_parts.plan), the reference SLMs included."""
  if "specialize" in sweep:
    return _expand_parts(sweep, root, python, spec)
  base_config = load_config(sweep["config"])
  points = []
  for name, overrides, merged in _named(sweep):
    config = config_overrides.applied(base_config, merged.items(), f"sweep point {name}: ")
    try:
      validate(config)
    except ConfigError as e:
      raise ConfigError(f"sweep point {name}: {e}") from None
    workdir = os.path.join(root, name)
    command = [python, "-m", "pn_jax.main", f"--config={sweep['config']}",
               f"--workdir={workdir}", "--mode=pretrain"]
    command += [f"--config.{k}={_cli(v)}" for k, v in merged.items()] + list(extra_args)
    points.append(Point(name, overrides, config, workdir, command))
  return points


def sweep_command(python: str, spec: str, root: str, unit: str) -> list[str]:
  """This driver on one unit of a specialized sweep: `--prepare`, or `--point=<name>`."""
  return [python, "-m", "pn_jax.sweep", f"--sweep={spec}", f"--root={root}", unit]


def _expand_parts(sweep: dict, root: str, python: str, spec: str) -> list[Point]:
  from pn_jax import sweep_parts
  named = _named(sweep)
  own = {name: overrides for name, overrides, _ in named}
  parts = sweep_parts.plan(sweep, [(name, merged) for name, _, merged in named], root,
                           f"sweep {spec}")
  return [Point(p.name, own.get(p.name, {}), p.config, p.workdir,
                sweep_command(python, spec, root, f"--point={p.name}"), p)
          for p in parts]


def _cli(value) -> str:
  if isinstance(value, (list, tuple)):
    return "(" + ",".join(map(_cli, value)) + ("," if len(value) == 1 else "") + ")"
  return _fmt(value)


def is_done(point: Point) -> bool:
  """The checkpoint of the run's last step is complete (checkpoint.is_complete: finalized, with
  its metadata and items); a step directory left empty or torn is not "done": the point runs
  again (and its own resume says what to do with that step). A part (a point scored by the
  specialized model) is done when its results.json records every stage (sweep_parts.is_done)."""
  if point.part is not None:
    from pn_jax import sweep_parts
    return sweep_parts.is_done(point.part)
  from pn_jax.train import checkpoint
  return checkpoint.is_complete(point.workdir, int(point.config.train.steps))


def share_data(point: Point, points: list[Point]) -> str | None:
  """Copies tokenizer, clusters and packed data from another point prepared with the same data
  settings (an h/m sweep prepares its data once). -> the source point's name, or None."""
  from pn_jax.data import pipeline
  if pipeline.is_prepared(point.workdir):
    return None
  want = pipeline.data_settings(point.config)
  for other in points:
    if other is not point and pipeline.prepared_with(other.workdir, want):
      pipeline.copy_prepared(other.workdir, point.workdir)
      return other.name
  return None


class PointSignals:
  """While installed: SIGTERM/SIGINT to the sweep go to the running point, and no point starts
  after one. The point checkpoints and exits 143/130 (pn_jax.train.loop.StopSignal) before the
  sweep exits, so it is never left training as an orphan that holds its workdir's lock, nor
  killed without its checkpoint where only the sweep gets the signal (a container's PID 1).

  Points run in their own process group: a signal to the sweep's whole group (Ctrl-C in a
  terminal, `kill -- -PGID`) reaches a point once, through the sweep, not twice (a second signal
  makes a point exit at once without saving). A second signal to the sweep is passed on too:
  the point then exits at once, as one run by hand does.
  """

  def __init__(self):
    self.signum: int | None = None  # the first signal received
    self._received: list[int] = []
    self._sent = 0  # how many of them the running point was sent
    self._point: subprocess.Popen | None = None
    self._previous = {}

  def __enter__(self) -> "PointSignals":
    for sig in (signal.SIGTERM, signal.SIGINT):
      self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)

  def _handle(self, signum, frame):
    del frame
    self.signum = self.signum or signum
    self._received.append(signum)
    self._forward()

  def _forward(self) -> None:
    while self._point is not None and self._sent < len(self._received):
      self._sent += 1
      self._point.send_signal(self._received[self._sent - 1])

  def run(self, command: list[str], out) -> int:
    """Runs one point to its exit (a signal that came while it started is passed on too)."""
    self._point = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT,
                                   process_group=0)
    self._forward()
    try:
      return self._point.wait()
    finally:
      self._point = None


def progress(point: Point) -> tuple[int, int]:
  """(done, total) of a running point: its last logged train step of train.steps
  (metrics.read_rows: a line the run is still writing is skipped; a resume that cut redone steps
  is read as it now is), or a part's stages recorded (sweep_parts.stages_done)."""
  if point.part is not None:
    from pn_jax import sweep_parts
    return sweep_parts.stages_done(point.part)
  from pn_jax.train import metrics
  rows = metrics.read_rows(os.path.join(point.workdir, "metrics.jsonl"))
  return (max((r["step"] for r in rows if r.get("split") == "train"), default=0),
          int(point.config.train.steps))


class StepBar:
  """While a point runs (its output goes to sweep.log): a bar of its training steps (a part's
  stages) with rate and ETA, read every `every_s` (and once more when the run ends)."""

  def __init__(self, point: Point, every_s: float = 2.0):
    self.point, self.every_s = point, every_s
    self.stopped = threading.Event()

  def _update(self) -> None:
    done, total = progress(self.point)
    if total != self.bar.total:  # a part's cells are known once its domains are counted
      self.bar.total = total
    self.bar.update(done - self.bar.n)

  def _follow(self) -> None:
    while not self.stopped.wait(self.every_s):
      self._update()

  def __enter__(self):
    from tqdm import tqdm
    done, total = progress(self.point)
    self.bar = tqdm(total=total, initial=done, desc=self.point.name, dynamic_ncols=True,
                    unit="stage" if self.point.part is not None else "step")
    self.thread = threading.Thread(target=self._follow, daemon=True)
    self.thread.start()
    return self

  def __exit__(self, *exc) -> None:
    self.stopped.set()
    self.thread.join()
    self._update()
    self.bar.close()


def run_local(points: list[Point], signals: PointSignals, *, log=print,
              reuse_data: bool = True) -> dict[str, int]:
  """Runs unfinished points one after another; output to <workdir>/sweep.log. -> exit codes.
  Stops after the running point once `signals` (installed by the caller) has a signal."""
  codes = {}
  for i, point in enumerate(points):
    if signals.signum is not None:
      break
    if is_done(point):
      log(f"[{i + 1}/{len(points)}] {point.name}: done, skipped")
      continue
    os.makedirs(point.workdir, exist_ok=True)
    if reuse_data and point.part is None and (source := share_data(point, points)):
      log(f"[{i + 1}/{len(points)}] {point.name}: data prepared by {source} reused")
    if signals.signum is not None:  # it came while the data was copied
      break
    t0 = time.time()
    log(f"[{i + 1}/{len(points)}] {point.name}: {shlex.join(point.command)}")
    with open(os.path.join(point.workdir, "sweep.log"), "a", encoding="utf-8") as out, \
        StepBar(point):
      code = signals.run(point.command, out)
    codes[point.name] = code
    log(f"[{i + 1}/{len(points)}] {point.name}: exit {code} in {time.time() - t0:.0f} s"
        + ("" if code == 0 else f" (see {point.workdir}/sweep.log)"))
  return codes


def run_prepare(command: list[str], root: str, signals: PointSignals, *, log=print) -> int:
  """A specialized sweep's data preparation (`--prepare`, before any point), its output to
  <root>/prepare.log. -> its exit code."""
  os.makedirs(root, exist_ok=True)
  log(f"prepare: {shlex.join(command)}")
  with open(os.path.join(root, "prepare.log"), "a", encoding="utf-8") as out:
    code = signals.run(command, out)
  log(f"prepare: exit {code}" + ("" if code == 0 else f" (see {root}/prepare.log)"))
  return code


def _sbatch_script(path: str, header: list[str], sbatch_flags: list[str], run: str) -> str:
  """An sbatch script: `header` and `sbatch_flags` as #SBATCH lines, the node's GPUs given to
  its one task, then `run` (shell) from this directory."""
  lines = header + [f"#SBATCH {flag}" for flag in sbatch_flags]
  with open(path, "w", encoding="utf-8") as f:
    f.write("#!/bin/bash\n" + "\n".join(lines) + "\n"
            "# Written by python -m pn_jax.sweep --mode=slurm.\n"
            "set -euo pipefail\n"
            "export NCCL_NVLS_ENABLE=0  # NVLink multicast stays off\n"
            "# one task per node (multi-node points): give it all the node's GPUs\n"
            "if [ -n \"${SLURM_GPUS_ON_NODE:-}\" ] && [ \"${SLURM_NTASKS_PER_NODE:-1}\" = 1 ]; then\n"
            "  export JAX_LOCAL_DEVICE_IDS=$(seq -s, 0 $((SLURM_GPUS_ON_NODE - 1)))\n"
            "fi\n"
            f"cd {shlex.quote(os.getcwd())}\n" + run + "\n")
  return path


def _slurm_out(root: str) -> str:
  return f"{os.path.abspath(root)}/slurm-%A_%a.out"


def write_slurm(points: list[Point], root: str, sbatch_flags: list[str]) -> str:
  """points.txt (one command per line) + sweep.sbatch (array task i runs line i)."""
  todo = [p for p in points if not is_done(p)]
  os.makedirs(root, exist_ok=True)
  lines_path = os.path.join(root, "points.txt")
  with open(lines_path, "w", encoding="utf-8") as f:
    f.writelines(shlex.join(p.command) + "\n" for p in todo)
  return _sbatch_script(
      os.path.join(root, "sweep.sbatch"),
      ["#SBATCH --job-name=pn-sweep", f"#SBATCH --array=0-{max(len(todo) - 1, 0)}",
       f"#SBATCH --output={_slurm_out(root)}"], sbatch_flags,
      f"line=$(sed -n \"$((SLURM_ARRAY_TASK_ID + 1))p\" {shlex.quote(os.path.abspath(lines_path))})\n"
      "echo \"point $SLURM_ARRAY_TASK_ID: $line\"\n"
      "eval \"srun $line\"")


def write_prepare_job(root: str, command: list[str], sbatch_flags: list[str]) -> str:
  """prepare.sbatch: a specialized sweep's data preparation, the job its array waits for."""
  return _sbatch_script(os.path.join(root, "prepare.sbatch"),
                        ["#SBATCH --job-name=pn-sweep-prepare",
                         f"#SBATCH --output={_slurm_out(root).replace('_%a', '')}"],
                        sbatch_flags, "srun " + shlex.join(command))


def submit_line(script: str, prepare: str = "") -> str:
  """The shell line that submits the array (after the `prepare` job, if one)."""
  if not prepare:
    return f"sbatch {shlex.quote(script)}"
  return (f"jid=$(sbatch --parsable {shlex.quote(prepare)}) && "
          f"sbatch --dependency=afterok:$jid {shlex.quote(script)}")


def _specialized(points: list[Point]) -> list:
  """The parts of a sweep scored by the specialized model ([] for a pretraining sweep)."""
  return [p.part for p in points if p.part is not None]


def _unprepared(points: list[Point]) -> bool:
  from pn_jax import sweep_parts
  parts = _specialized(points)
  return bool(parts) and not sweep_parts.is_prepared(parts)


def _unit(f, points: list[Point]) -> int:
  """--prepare / --point: one unit of a specialized sweep, in this process."""
  from pn_jax import cli, sweep_parts
  parts = _specialized(points)
  unit = "--prepare" if f.prepare else f"--point={f.point}"
  if not parts:
    raise cli.UsageError(f"{unit}: only a sweep with `specialize` has units to run; this one's "
                         "points are pn_jax.main commands (--mode=print)")
  if f.prepare:
    sweep_parts.prepare(parts)
    return 0
  named = {p.name: p for p in parts}
  if f.point not in named:
    raise cli.UsageError(f"--point={f.point}: not a point of this sweep: {list(named)}")
  if not sweep_parts.is_prepared(parts):
    raise cli.UsageError(f"--root={f.root}: the sweep's data is not prepared yet: run "
                         "--prepare first (--mode=local does it itself)")
  return sweep_parts.run(named[f.point])


def _gather(sweep: dict, points: list[Point], root: str) -> tuple[list[str], str]:
  """-> (the results' paths, the table as markdown)."""
  from pn_jax import sweep_results
  parts = _specialized(points)
  if not parts:
    table = sweep_results.gather(points)
    return sweep_results.write(table, root, plot_spec=sweep.get("plot")), \
        sweep_results.markdown(table)
  from pn_jax import sweep_parts, sweep_scores
  rows = sweep_scores.gather(points, sweep_parts.merged(parts))
  return (sweep_scores.write(rows, points, root, sweep_parts.plot_x(sweep)),
          sweep_scores.markdown(rows))


def _run_local(f, points: list[Point], prepare: list[str]) -> tuple[dict[str, int], int | None]:
  """-> (exit codes, the signal that stopped the sweep or None)."""
  from pn_jax import workdir_lock
  log = lambda s: print(s, file=sys.stderr)
  codes = {}
  with (workdir_lock.hold(f.root, "sweep", flag="--root"),  # each point locks its own
        PointSignals() as signals):
    if _unprepared(points):
      codes["prepare"] = run_prepare(prepare, f.root, signals, log=log)
    if not any(codes.values()):
      codes.update(run_local(points, signals, log=log, reuse_data=f.reuse_data))
  return codes, signals.signum


def main(argv=None) -> int:
  from absl import flags
  from pn_jax import cli
  del argv
  f = flags.FLAGS
  if f.mode == "gather" and not os.path.isdir(f.root):  # gather reads a root; it makes none
    raise cli.UsageError(f"--root={f.root} is not a directory: nothing to gather; pass the "
                         "--root that --mode=local (or the points' jobs) wrote to")
  sweep = load_sweep(f.sweep)
  if "specialize" in sweep and f.main_arg:
    raise cli.UsageError("--main_arg: a sweep with `specialize` runs its points through the "
                         "experiment driver, not pn_jax.main; put settings in the definition")
  points = expand(sweep, f.root, python=f.python, extra_args=tuple(f.main_arg or ()),
                  spec=f.sweep)
  if f.prepare or f.point is not None:
    return _unit(f, points)
  prepare = sweep_command(f.python, f.sweep, f.root, "--prepare")
  print(f"sweep {f.sweep}: {len(points)} points under {f.root} "
        f"({sum(map(is_done, points))} done)", file=sys.stderr)
  if f.mode == "print":
    if _unprepared(points):
      print("the first command prepares the data: run it before the others", file=sys.stderr)
      print(shlex.join(prepare))
    for p in points:
      if not is_done(p):
        print(shlex.join(p.command))
    return 0
  if f.mode == "slurm":
    sbatch = list(f.sbatch or ())
    script = write_slurm(points, f.root, sbatch)
    submit = submit_line(script, write_prepare_job(f.root, prepare, sbatch)
                         if _unprepared(points) else "")
    print(submit)
    return subprocess.run(["bash", "-c", submit]).returncode if f.submit else 0
  codes, signum = _run_local(f, points, prepare) if f.mode == "local" else ({}, None)
  if signum is not None:
    print(f"sweep stopped by {signal.Signals(signum).name} after its running point "
          "(a point that was training saved a checkpoint); rerun the same command to resume",
          file=sys.stderr)
    return 128 + signum
  paths, table = _gather(sweep, points, f.root)
  print(table)
  print("wrote " + " ".join(paths), file=sys.stderr)
  failed = [name for name, code in codes.items() if code != 0]
  if failed:
    print(f"error: {len(failed)} point(s) failed: {', '.join(failed)}", file=sys.stderr)
    return 1
  return 0


def run():
  from absl import app, flags
  flags.DEFINE_string("sweep", None, "Sweep definition: configs/sweeps/<name>.py[:arg].")
  flags.DEFINE_string("root", None, "Directory holding one workdir per point.")
  flags.DEFINE_enum("mode", "local", ["local", "print", "slurm", "gather"], "See module doc.")
  flags.DEFINE_bool("prepare", False, "A sweep with `specialize`: only prepare its data, here.")
  flags.DEFINE_string("point", None, "A sweep with `specialize`: only run this point (or "
                      "reference, by name), here.")
  flags.DEFINE_string("python", sys.executable, "Interpreter for the per-point commands.")
  flags.DEFINE_multi_string("main_arg", [], "Extra argument for every pn_jax.main command.")
  flags.DEFINE_multi_string("sbatch", [], "Extra #SBATCH line, e.g. --sbatch=--gres=gpu:8.")
  flags.DEFINE_bool("submit", False, "slurm mode: also run sbatch.")
  flags.DEFINE_bool("reuse_data", True, "local mode: copy tokenizer/clusters/packed data from a "
                    "point with the same data settings instead of preparing them again.")
  flags.mark_flags_as_required(["sweep", "root"])

  from pn_jax import cli
  app.run(cli.entry(main), flags_parser=cli.parse_flags)


if __name__ == "__main__":
  run()
