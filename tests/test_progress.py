"""What the loop carries across checkpoints besides the arrays: early stopping and costs.json."""

import json
import math
import os
import shutil

import jax
import numpy as np
import pytest

from conftest import copy_workdir, load_config
from pn_jax.modes.pretrain import pretrain
from pn_jax.train import flops as flops_lib
from pn_jax.train import loop
from pn_jax.train.checkpoint import Checkpointer
from pn_jax.train.costs import read_costs
from pn_jax.train.early_stop import EarlyStop
from test_train import final_params, small_run


def test_early_stop_counts_evals_without_improvement():
  early = EarlyStop(patience=2)
  assert not early.update(10, 3.0) and (early.best_step, early.evals_since) == (10, 0)
  assert not early.update(20, 2.5)  # better: the count restarts
  assert not early.update(30, 2.5)  # equal is not better
  assert early.update(40, 2.7) and early.stopped
  assert (early.best_step, early.best_loss, early.evals_since) == (20, 2.5, 2)
  never = EarlyStop(patience=0)
  assert not any(never.update(s, 1.0 + s) for s in range(1, 10))  # 0: never stops
  assert never.best_step == 1


def test_early_stop_round_trips_through_json():
  fresh = EarlyStop.from_json(3, None)
  assert fresh == EarlyStop(3)
  assert json.loads(json.dumps(fresh.to_json()))["best_loss"] is None  # no inf in JSON
  early = EarlyStop(3)
  for step, loss in ((2, 4.0), (4, 3.5), (6, 3.9)):
    early.update(step, loss)
  again = EarlyStop.from_json(3, json.loads(json.dumps(early.to_json())))
  assert again == early
  assert again.update(8, 3.6) is False and again.update(10, 3.7) is True


def test_a_stopped_run_stays_stopped_through_json():
  """A run that early stopping ended is still stopped after its checkpoint's round trip (a
  rerun trains no further); the same state under a larger patience trains on."""
  early = EarlyStop(2)
  for step, loss in ((5, 1.0), (10, 1.5), (15, 1.2)):
    stop = early.update(step, loss)
  assert stop and early.stopped and (early.best_step, early.best_loss) == (5, 1.0)
  saved = json.loads(json.dumps(early.to_json()))
  assert saved == {"best_loss": 1.0, "best_step": 5, "evals_since": 2}
  assert EarlyStop.from_json(2, saved).stopped
  patient = EarlyStop.from_json(3, saved)
  assert not patient.stopped and patient.update(20, 0.9) is False
  assert (patient.best_step, patient.evals_since) == (20, 0)


def _scripted_evals(monkeypatch, losses):
  """fit's eval passes return `losses` in order (the real eval of a tiny run keeps improving;
  a script makes early stopping's decisions known in advance)."""
  it = iter(losses)
  monkeypatch.setattr(loop, "heldout_loss_fn", lambda run, eval_step, split: (
      lambda params: {"loss": next(it), "perplexity": 1.0, "tokens": 1.0}))


def test_resumed_early_stopping_stops_where_an_uninterrupted_run_does(prepared, tmp_path,
                                                                     monkeypatch):
  """Evals at 2, 4, ...: best at 4, patience 3 -> stop at 10. Interrupted at 7 (one eval after
  the best), the resumed run must still stop at 10 with best step 4 and the same params; a
  resume that forgot the best would take step 8 as its best and train on."""
  losses = [2.0, 1.5, 1.7, 1.8, 1.9, 2.0, 2.1, 2.2, 2.3, 2.4]
  settings = dict(steps=20, eval_every=2, checkpoint_every=2, keep_checkpoints=10, log_every=1,
                  early_stop_patience=3)
  straight = copy_workdir(prepared, tmp_path, "straight")
  _scripted_evals(monkeypatch, losses)
  ref = pretrain(small_run(load_config("pn"), **settings), straight)
  assert (ref["stopped_at"], ref["stop_reason"], ref["best_step"]) == (10, "early_stopping", 4)

  resumed = copy_workdir(prepared, tmp_path, "resumed")
  _scripted_evals(monkeypatch, losses[:3])  # evals at 2, 4, 6
  first = pretrain(small_run(load_config("pn"), stop_at_step=7, **settings), resumed)
  assert (first["stopped_at"], first["stop_reason"]) == (7, "stop_at_step")
  _scripted_evals(monkeypatch, losses[3:])  # evals at 8, 10, ...
  out = pretrain(small_run(load_config("pn"), **settings), resumed)
  assert (out["stopped_at"], out["stop_reason"]) == (10, "early_stopping")
  assert (out["best_step"], out["best_eval_loss"]) == (ref["best_step"], ref["best_eval_loss"])
  jax.tree.map(np.testing.assert_array_equal, final_params(straight, load_config("pn")),
               final_params(resumed, load_config("pn")))

  # Rerunning a finished run trains no further and reports the same best step.
  _scripted_evals(monkeypatch, [])
  again = pretrain(small_run(load_config("pn"), **settings), resumed)
  assert (again["step"], again["stop_reason"], again["best_step"]) == (10, "early_stopping", 4)
  assert Checkpointer(resumed, read_only=True).latest_step() == 10


def test_costs_record_every_checkpoint_and_survive_a_resume(prepared, tmp_path):
  config = small_run(load_config("pn"), steps=6, checkpoint_every=2, eval_every=4, log_every=1)
  workdir = copy_workdir(prepared, tmp_path)
  pretrain(config, workdir)
  costs = read_costs(workdir)
  assert costs["device"] == jax.devices()[0].device_kind
  assert costs["device_count"] == jax.device_count() == 8
  steps = costs["steps"]
  assert sorted(steps, key=int) == ["2", "4", "6"]
  d = config.data
  per_step = flops_lib.train_flops_per_step(config.model, d.batch_size, d.seq_len)
  for key, entry in steps.items():
    assert set(entry) == {"train_seconds", "flops", "tokens", "eval_loss", "eval_perplexity"}
    assert entry["flops"] == pytest.approx(int(key) * per_step)
    assert entry["tokens"] == int(key) * d.batch_size * d.seq_len
  assert steps["2"]["eval_loss"] is None and steps["2"]["eval_perplexity"] is None
  evals = [json.loads(x) for x in open(os.path.join(workdir, "metrics.jsonl"))]
  evals = {r["step"]: r for r in evals if r["split"] == "eval"}
  for s in (4, 6):  # the eval at that step, as logged
    assert steps[str(s)]["eval_loss"] == pytest.approx(evals[s]["loss"])
    assert math.exp(steps[str(s)]["eval_loss"]) == pytest.approx(
        steps[str(s)]["eval_perplexity"])
  seconds = [steps[s]["train_seconds"] for s in ("2", "4", "6")]
  assert 0 <= seconds[0] <= seconds[1] <= seconds[2] and seconds[2] > 0

  # Resume from step 4 (step 6 lost): entries up to 4 kept, 6 dropped, seconds continue from 4.
  shutil.rmtree(os.path.join(workdir, "checkpoints", "6"))
  config.train.steps = 5
  pretrain(config, workdir)
  after = read_costs(workdir)["steps"]
  assert sorted(after, key=int) == ["2", "4", "5"]
  assert after["2"] == steps["2"] and after["4"] == steps["4"]
  assert after["5"]["train_seconds"] >= after["4"]["train_seconds"]
  assert read_costs(str(tmp_path / "nothing")) == {}


def test_checkpoints_without_progress_still_resume(prepared, tmp_path, monkeypatch):
  """Checkpoints from before the `progress` item: resume with fresh early stopping and the
  seconds of costs.json's entry for the restored step."""
  real = Checkpointer.save
  monkeypatch.setattr(Checkpointer, "save",
                      lambda self, *a, progress=None, **k: real(self, *a, **k))
  config = small_run(load_config("pn"), steps=2, checkpoint_every=2, eval_every=2, log_every=1)
  workdir = copy_workdir(prepared, tmp_path)
  pretrain(config, workdir)
  assert Checkpointer(workdir, read_only=True).saved_progress(2) is None
  monkeypatch.setattr(Checkpointer, "save", real)
  config.train.steps = 4
  assert pretrain(config, workdir)["best_step"] == 4  # the step-2 eval was forgotten
  steps = read_costs(workdir)["steps"]
  assert steps["4"]["train_seconds"] >= steps["2"]["train_seconds"] > 0
  assert Checkpointer(workdir, read_only=True).saved_progress(4)["early_stop"]["best_step"] == 4
