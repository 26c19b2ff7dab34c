"""The training loop of every mode that trains (`fit`): a run in, checkpoints and metrics out.

The host dispatches step n, then reads step n-1's metrics, so it never waits on the device
except at logging, checkpoint and eval boundaries. A checkpoint is written only after its step's
metrics were checked finite, so the last checkpoint is always a good one.
"""

from __future__ import annotations

import dataclasses
import signal
import time
from typing import TYPE_CHECKING

import jax
import numpy as np
from absl import logging
import ml_collections
from tqdm import tqdm

from pn_jax.config import ConfigError
from pn_jax.data import batches
from pn_jax.parallel import distributed, mesh as mesh_lib
from pn_jax.train import costs as costs_lib
from pn_jax.train import flops as flops_lib
from pn_jax.train import preflight
from pn_jax.train import resume_check
from pn_jax.train.checkpoint import Checkpointer
from pn_jax.train.early_stop import EarlyStop
from pn_jax.train.compile import compile_steps, step_options
from pn_jax.train.metrics import MetricWriter, step_line
from pn_jax.train.optimizer import make_optimizer
from pn_jax.train.state import create_state, state_shardings

if TYPE_CHECKING:  # the run a mode opened (pn_jax/run.py), which builds on this package
  from pn_jax.run import Run


class TrainingDiverged(RuntimeError):
  """A non-finite loss or gradient norm under train.nan_policy='stop'."""


class _CloseOnError:
  """On an exception leaving the loop, still finish in-flight async saves and flush metrics, so
  the last good checkpoint is committed before the process exits."""

  def __init__(self, *closables):
    self._closables = list(closables)

  def add(self, closable):
    self._closables.append(closable)
    return closable

  def __enter__(self):
    return self

  def __exit__(self, exc_type, *exc):
    if exc_type is not None:
      for c in self._closables:
        try:
          c.close()
        except Exception as e:  # noqa: BLE001 - keep the original error
          logging.error("while closing %s after an error: %s", type(c).__name__, e)


def summed_loss(eval_step, params, local_batches, mesh) -> tuple[float, float]:
  """(sum of token losses, tokens) of `eval_step` over this process's batches, each made global
  on `mesh`: the one held-out sum behind every mean loss (heldout_loss, expert selection, the
  pruning's calibration loss)."""
  total, count = 0.0, 0.0
  for local in local_batches:
    out = eval_step(params, mesh_lib.global_batch(local, mesh))
    total += float(out["loss_sum"])
    count += float(out["tokens"])
  return total, count


def heldout_loss(run: Run, eval_step, params, *, split: str = "validation",
                 domain: str | None = None) -> dict[str, float]:
  """Token-weighted mean loss and perplexity over `split` of the generic text, or of `domain`'s
  text (None: the run's data.domain, "" for generic), with the run's eval batch settings."""
  d = run.config.data
  domain = (d.get("domain", "") or "") if domain is None else domain
  it = batches.eval_batches(
      run.data, split=split, domain=domain, batch_size=d.batch_size,
      max_batches=d.eval_batches, mode=d.cluster_batching, num_workers=d.get("num_workers", 0),
      shard=batches.Shard(**distributed.data_shard(run.mesh, d.batch_size)))
  total, count = summed_loss(eval_step, params, it, run.mesh)
  if count == 0:
    raise ValueError(f"the {split} split produced no tokens to evaluate")
  loss = total / count
  return {"loss": loss, "perplexity": float(np.exp(min(loss, 50.0))), "tokens": count}


class StopSignal:
  """Turns SIGTERM/SIGINT into a flag the loop checks between steps (then saves and exits).

  A second signal exits at once without saving (exit code 128 + signal number), for a user who
  really wants out; the previous checkpoint is still intact since orbax commits atomically.
  """

  def __init__(self):
    self.received: int | str | None = None
    self.requested: int | None = None  # multi-process: a signal not yet agreed on
    self._previous = {}

  def sync(self, step: int, every: int) -> None:
    """Multi-process: every `every` steps, a signal seen by any process stops all of them here
    (one process stopping alone would leave the others hanging in the next step)."""
    if distributed.is_multiprocess() and step % every == 0 and self.received is None:
      signum = distributed.max_over_processes(self.requested or 0)
      if signum:
        self.received = signum

  @property
  def reason(self) -> str:
    r = self.received
    return signal.Signals(r).name if isinstance(r, int) else str(r)

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      try:
        self._previous[sig] = signal.signal(sig, self.handle)
      except ValueError:  # not the main thread (e.g. inside some test runners)
        pass
    return self

  def handle(self, signum, frame):
    """The SIGTERM/SIGINT handler (while in the `with` block)."""
    del frame
    if isinstance(self.received, int) or isinstance(self.requested, int):
      raise SystemExit(128 + signum)
    if distributed.is_multiprocess():
      self.requested = signum  # acted on by sync(), at the same step on every process
    else:
      self.received = signum
    logging.warning("received %s: will checkpoint and exit after the current step",
                    signal.Signals(signum).name)

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


class _WallClockSaves:
  """Checkpoints by wall clock as well as by step count: with varying step times (evals, shared
  hosts, a slow data shard) a step interval is a poor bound on the work a crash loses. In
  multi-process runs the processes decide together at the sync points, so all save one step."""

  def __init__(self, minutes: float):
    self.seconds = 60.0 * minutes
    self.last = time.monotonic()

  def due(self, step: int, every: int) -> bool:
    if not self.seconds:
      return False
    late = time.monotonic() - self.last >= self.seconds
    if not distributed.is_multiprocess():
      return late
    return step % every == 0 and bool(distributed.max_over_processes(int(late)))

  def saved(self) -> None:
    self.last = time.monotonic()


def heldout_loss_fn(run: Run, eval_step, split: str):
  """params -> heldout_loss on `split`: fit's eval (a seam the tests replace)."""
  return lambda params: heldout_loss(run, eval_step, params, split=split)


class _Window:
  """Host-side metrics between two log lines: applies the NaN policy to each step's metrics as
  they arrive and averages the finite losses into the next log line's scalars."""

  def __init__(self, config: ml_collections.ConfigDict, *, skipped: int, step_flops: float,
               peak: float | None):
    self.nan_policy = config.train.nan_policy
    self.step_tokens = config.data.batch_size * config.data.seq_len
    self.skipped, self.step_flops, self.peak = skipped, step_flops, peak
    self._reset()

  def _reset(self) -> None:
    self.t0, self.steps, self.loss, self.finite = time.perf_counter(), 0, 0.0, 0

  def add(self, step: int, metrics, ckpt: Checkpointer) -> dict:
    """Blocks on one step's metrics; -> them on the host. TrainingDiverged under 'stop'."""
    host = jax.device_get(metrics)
    if host["nonfinite"]:
      if self.nan_policy == "stop":
        good = ckpt.latest_step()
        raise TrainingDiverged(
            f"non-finite loss ({host['loss']}) or grad norm ({host['grad_norm']}) at step "
            f"{step}; " + (f"the last good checkpoint is step {good} in {ckpt.directory}"
                           if good is not None else "no checkpoint was saved before it") +
            " (train.nan_policy='skip' skips such updates instead)")
      self.skipped += 1
      logging.warning("step %d: non-finite loss (%s) or grad norm (%s): update skipped "
                      "(%d skipped so far)", step, host["loss"], host["grad_norm"], self.skipped)
    self.steps += 1
    if not host["nonfinite"]:
      self.finite += 1
      self.loss += float(host["loss"])
    return host

  def scalars(self, host: dict) -> dict[str, float]:
    """The log line for the window ending at `host`'s step; starts the next window."""
    step_time = (time.perf_counter() - self.t0) / max(self.steps, 1)
    loss = self.loss / self.finite if self.finite else float("nan")
    scalars = {"loss": loss, "grad_norm": host["grad_norm"], "lr": host["lr"],
               "step_time_s": step_time, "tokens_per_s": self.step_tokens / step_time,
               "perplexity": float(np.exp(min(loss, 50.0)))}
    if self.nan_policy == "skip":
      scalars["skipped_steps"] = self.skipped
    if self.peak:
      scalars["mfu"] = self.step_flops / step_time / (self.peak * jax.device_count())
    self._reset()
    return scalars


@dataclasses.dataclass(frozen=True)
class _Boundary:
  """What the loop does after a step, decided once: eval and/or save (a boundary blocks on the
  step's metrics); `log` applies at a boundary (other steps are logged one step late)."""

  log: bool
  eval: bool
  save: bool

  @classmethod
  def at(cls, step: int, t: ml_collections.ConfigDict, *, stopping: bool, timed: bool):
    last = step == t.steps
    return cls(log=step % t.log_every == 0 or last, eval=step % t.eval_every == 0 or last,
               save=step % t.checkpoint_every == 0 or last or stopping or timed)

  @property
  def any(self) -> bool:
    return self.eval or self.save


class _Progress:
  """The loop's bookkeeping that outlives a process: early stopping and training seconds, saved
  in each checkpoint's `progress` item; and the costs.json entry for each checkpoint."""

  def __init__(self, run: Run, step_flops: float):
    t, d = run.config.train, run.config.data
    self.early = EarlyStop(t.early_stop_patience)
    self.clock = costs_lib.Stopwatch()
    self.costs = costs_lib.CostLog(run.workdir, step_flops=step_flops,
                                   step_tokens=d.batch_size * d.seq_len)
    self.last_eval: tuple[int, dict] | None = None

  def restore(self, ckpt: Checkpointer, step: int) -> None:
    saved = ckpt.saved_progress(step) or {}
    self.early = EarlyStop.from_json(self.early.patience, saved.get("early_stop"))
    seconds = self.costs.resume(step)
    if "train_seconds" in saved:
      seconds = saved["train_seconds"]
    self.clock = costs_lib.Stopwatch(seconds or 0.0)

  def evaluated(self, step: int, ev: dict) -> bool:
    """Records an eval; -> True when early stopping says stop."""
    self.last_eval = (step, ev)
    return self.early.update(step, ev["loss"])

  def to_json(self) -> dict:
    return {"early_stop": self.early.to_json(), "train_seconds": self.clock.seconds}

  def saved(self, step: int) -> None:
    """After the checkpoint of `step`: its costs.json entry (with the eval, if one ran there)."""
    ev = self.last_eval[1] if self.last_eval and self.last_eval[0] == step else None
    self.costs.record(step, self.clock.seconds, ev)


def _restore_or_create(run: Run, tx, ckpt: Checkpointer, train_iter, progress: _Progress, *,
                       init_params, allow_config_change: bool):
  """-> (state, its shardings, start step): the latest checkpoint in run.workdir (after the
  resume checks; `train_iter` and `progress` restored with it), else a new state from
  `init_params` or a fresh init. Preflight checks run first, before anything is written."""
  abstract, shardings = state_shardings(run.model, tx, run.mesh, run.rules)
  preflight.check_shardings(abstract.params)
  preflight.check_workdir(run.workdir, abstract)
  start = ckpt.latest_step()
  if start is None:
    state, _ = create_state(run.model, tx, run.mesh, run.rules, jax.random.key(run.config.seed),
                            params=init_params)
    return state, shardings, 0
  if start > run.config.train.steps:  # nothing to train, and not the run it asks for
    raise ConfigError(f"config.train.steps={run.config.train.steps} is below the step of the "
                      f"checkpoint to resume from, {start} (in {ckpt.directory}): this run is "
                      f"already past it; pass --config.train.steps={start} (or more) to resume, "
                      "or use a fresh --workdir to train a shorter run")
  resume_check.check_resume(ckpt, start, run.config, allow_change=allow_config_change)
  state, start = ckpt.restore(abstract, data_iter=train_iter)
  progress.restore(ckpt, start)
  logging.info("resumed from step %d in %s", start, ckpt.directory)
  return state, shardings, start


def _skipped_updates(state) -> int:
  """Under nan_policy='skip', optax.apply_if_finite counts skipped updates in the optimizer
  state, so the count survives resumes (one count per expert for independent experts)."""
  return int(np.sum(jax.device_get(getattr(state.opt_state, "total_notfinite", 0))))


@dataclasses.dataclass
class _Host:
  """The host side of the loop: reads each step's metrics (the previous step's after the next
  is dispatched; at once at a boundary), logs them, and evaluates and saves at boundaries.
  `final` collects what fit returns."""

  config: ml_collections.ConfigDict
  ckpt: Checkpointer
  writer: MetricWriter
  progress: _Progress
  window: _Window
  stop: StopSignal
  bar: tqdm
  train_iter: object
  run_eval: object  # params -> eval metrics
  clock: _WallClockSaves
  keep_best: bool = False  # never garbage-collect the best eval step's checkpoint
  final: dict = dataclasses.field(default_factory=dict)
  pending: tuple | None = None  # (step, device metrics) of the last dispatched step

  def dispatched(self, step: int, metrics) -> None:
    """After dispatching `step`: reads the step before it (logged now if it was a log step)."""
    if self.pending is not None:
      previous, host = self.pending[0], self.read()
      if previous % self.config.train.log_every == 0:
        self.log(previous, host)
    self.pending = (step, metrics)
    self.bar.update(1)

  def read(self) -> dict:
    """Blocks on the pending step's metrics; -> them on the host (NaN policy applied)."""
    (step, metrics), self.pending = self.pending, None
    host = self.window.add(step, metrics, self.ckpt)
    self.progress.clock.start()  # (a no-op after the first step: see fit's docstring)
    return host

  def log(self, step: int, host: dict) -> None:
    scalars = self.window.scalars(host)
    self.writer.write(step, scalars)
    self.bar.set_postfix(loss=f"{scalars['loss']:.3f}", tok_s=f"{scalars['tokens_per_s']:.0f}")
    if self.writer.enabled:
      logging.info("%s", step_line(step, scalars, step_flops=self.window.step_flops,
                                   devices=jax.device_count()))
    self.final.update(scalars)

  def boundary(self, step: int) -> _Boundary:
    """What is due after `step`, with signals agreed on and the wall clock consulted."""
    t = self.config.train
    self.stop.sync(step, t.log_every)
    if step == t.stop_at_step and not self.stop.received:
      self.stop.received = "stop_at_step"
    return _Boundary.at(step, t, stopping=bool(self.stop.received),
                        timed=self.clock.due(step, t.log_every))

  def at_boundary(self, step: int, state, due: _Boundary) -> bool:
    """Logs, evaluates and saves `step` as `due` says; -> True when training stops here."""
    host = self.read()
    if due.log:
      self.log(step, host)
    if due.eval:
      self.evaluate(step, state.params)
    if due.save or self.stop.received:
      self.save(step, state)
    if self.stop.received:
      logging.warning("stopping (%s): saved step %d, exiting", self.stop.reason, step)
      self.final.update(stopped_at=step, stop_reason=self.stop.reason)
    return bool(self.stop.received)

  def evaluate(self, step: int, params) -> None:
    with self.progress.clock.paused():
      ev = self.run_eval(params)
    self.writer.write(step, ev, prefix="eval")
    self.final.update({f"eval_{k}": v for k, v in ev.items()})
    if self.progress.evaluated(step, ev):
      self.stop.received = self.stop.received or "early_stopping"

  def save(self, step: int, state) -> None:
    with self.progress.clock.paused():
      best = self.progress.early.best_step if self.keep_best else None
      self.ckpt.save(step, state, self.config, self.train_iter,
                     progress=self.progress.to_json(), force=True, keep_step=best or None)
      self.writer.flush()  # TensorBoard on disk up to the checkpoint too, as the JSONL is
      self.progress.saved(step)
    self.clock.saved()

  def close(self) -> None:
    self.bar.close()
    self.ckpt.close()
    self.writer.close()


def _result(final: dict, step: int, early: EarlyStop) -> dict[str, float]:
  final["step"] = step
  if early.best_step:
    final.update(best_eval_loss=early.best_loss, best_step=early.best_step)
  return final


def fit(run: Run, train_iter, *, init_params=None, eval_split: str = "validation",
        desc: str = "pretrain", allow_config_change: bool = False,
        keep_best: bool = False) -> dict[str, float]:
  """The training loop shared by pretraining and fine-tuning.

  Resumes from the latest checkpoint in run.workdir if there is one; otherwise starts from
  `init_params` (a params tree, e.g. a projected small model) or a fresh init. With
  train.early_stop_patience > 0, stops after that many evals without a better eval loss; the
  early-stopping state (best loss, best step, evals since) is saved with every checkpoint and
  restored on resume, so a resumed run stops where an uninterrupted one would. A resume first
  compares the checkpoint's saved config with run.config (resume_check.py): a changed key other
  than run control is refused unless `allow_config_change`.

  keep_best: the checkpoint of the best eval step so far (early stopping's best step, tracked for
  every patience) is kept however many newer ones train.keep_checkpoints lets go, so a caller can
  restore it at the end (specialize: save at every eval to have it on disk).

  Costs: each checkpoint's cumulative `train_seconds` goes to <workdir>/costs.json
  (pn_jax/train/costs.py). It counts host wall-clock time from the end of the first step this
  process runs (that step, dominated by XLA compilation, is left out, once per start or resume)
  up to the checkpoint, minus the time spent in eval passes and in checkpoint/costs writes; it
  includes everything else the loop does per step (data loading, dispatch, metric logging).
  Every eval and save first blocks on the step's metrics, so no training work overlaps them.
  """
  config, t = run.config, run.config.train
  tx, schedule = make_optimizer(config)
  ckpt = Checkpointer(run.workdir, keep=t.keep_checkpoints, async_save=t.async_checkpoint)
  peak = flops_lib.peak_flops(override_tflops=t.peak_tflops)
  step_flops = flops_lib.train_flops_per_step(config.model, config.data.batch_size,
                                              config.data.seq_len)
  progress = _Progress(run, step_flops)
  with (mesh_lib.activate(run.mesh, run.rules), StopSignal() as stop,
        _CloseOnError(ckpt) as closing):
    state, shardings, start = _restore_or_create(run, tx, ckpt, train_iter, progress,
                                                 init_params=init_params,
                                                 allow_config_change=allow_config_change)
    # Only now (a refused resume writes nothing): the log cut back to `start` (redone steps).
    writer = closing.add(MetricWriter(run.workdir, start_step=start))
    window = _Window(config, skipped=_skipped_updates(state), step_flops=step_flops, peak=peak)
    train_step, eval_step = compile_steps(run.model, tx, schedule, run.mesh, shardings,
                                          **step_options(config))
    # (closed on an error too, so the error line comes after the bar's last redraw)
    bar = closing.add(tqdm(total=t.steps, initial=start,
                           disable=not (t.progress_bar and writer.enabled), desc=desc,
                           dynamic_ncols=True))
    host = _Host(config, ckpt, writer, progress, window, stop, bar, train_iter,
                 heldout_loss_fn(run, eval_step, eval_split),
                 _WallClockSaves(t.checkpoint_every_minutes), keep_best=keep_best)
    step = start
    if progress.early.stopped:  # resumed after early stopping had ended the run
      host.final.update(stopped_at=step, stop_reason="early_stopping")
    while step < t.steps and not progress.early.stopped:
      state, metrics = train_step(state, mesh_lib.global_batch(next(train_iter), run.mesh))
      step += 1
      host.dispatched(step, metrics)  # reads step - 1's metrics while the device runs `step`
      due = host.boundary(step)
      if due.any and host.at_boundary(step, state, due):
        break
    host.close()
  return _result(host.final, step, progress.early)
