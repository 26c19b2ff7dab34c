"""Equal device time by fitted runs: a method's step is timed alone (pn_jax.step_costs,
launch/step_costs.py), and `pretrain_scale=time:<method>` trains it for as many steps as fit in
that method's training time, with its own schedule; the equal-time view compares it whole."""

import json
import os

import ml_collections
import pytest

from conftest import REPO
from pn_jax.config import ConfigError

PN = "model.k=2,model.h=4,model.m=2"


def _exp():
  from pn_jax import config as config_lib
  exp = config_lib.load_config(str(REPO / "configs" / "experiments" / "cpu_small.py"))
  exp.update(source="tiny", domains=("legal",), budgets=(2048,), vocab_size=512, seq_len=64,
             batch_size=8, pretrain_tokens=40 * 8 * 64, eval_batches=2, distill=False)
  exp.methods = ml_collections.ConfigDict(dict(
      slm=("configs/slm.py:tiny", ""),
      pn=("configs/pn.py:tiny", PN),
      pn_fit=("configs/pn.py:tiny", PN + ",seed=3,optim.lr=0.01,pretrain_scale=time:slm")),
      sort_keys=False)
  return exp


def _costs_file(path, exp, seconds, device=None):
  """A step costs file as launch/step_costs.py writes it, with made-up seconds per step
  (measured on this process's device unless `device` says another)."""
  from pn_jax import experiment, step_costs
  configs = experiment.step_cost_configs(exp)
  device = device or step_costs.this_device()
  with open(path, "w") as f:
    json.dump({step_costs.cost_key(configs[n]): {"step_seconds": s, "method": n,
                                                 "device": device}
               for n, s in seconds.items()}, f)


def test_runs_of_one_architecture_share_a_cost_and_other_shapes_do_not():
  from pn_jax import experiment, step_costs
  exp = _exp()
  build = lambda overrides: experiment.pretrain_config(exp, "configs/pn.py:tiny", overrides,
                                                       "corpus", "tok")
  key = step_costs.cost_key(build(PN))
  for same in (",seed=1", ",optim.lr=0.1,optim.warmup_steps=3", ",model.code_init=random",
               ",model.code_spread=0.5", ",pretrain_scale=0.5"):
    assert step_costs.cost_key(build(PN + same)) == key, same
  for other in (",model.k=4", ",model.h=8", ",data.cluster_batching=homogeneous"):
    assert step_costs.cost_key(build(PN + other)) != key, other
  # what is timed: the fitted run and its reference; pn_fit's measurement is pn's too
  configs = experiment.step_cost_configs(exp)
  assert sorted(configs) == ["pn_fit", "slm"]
  assert step_costs.cost_key(configs["pn_fit"]) == key


def test_a_fitted_run_trains_for_the_references_time_with_its_own_schedule(tmp_path):
  from pn_jax import experiment
  exp, root = _exp(), str(tmp_path)
  _costs_file(tmp_path / "step_costs.json", exp, {"slm": 1.0, "pn_fit": 1.6})
  full = experiment.pretrain_config(exp, "configs/slm.py:tiny", "", "corpus", "tok", root)
  spec, overrides, _ = experiment.method_spec(exp, "pn_fit")
  c = experiment.pretrain_config(exp, spec, overrides, "corpus", "tok", root)
  assert full.train.steps == 40 and c.train.steps == 25  # 40 x 1.0 / 1.6
  assert c.optim.warmup_steps == 1 and c.train.checkpoint_every == 6  # milestones of 25 steps
  assert c.seed == 3 and c.optim.lr == 0.01  # its other overrides still apply
  assert experiment.time_fitted_to(exp, "pn_fit") == "slm"
  assert experiment.time_fitted_to(exp, "pn") == ""
  # a reference outside the methods (exp.time_references), and exp.step_costs elsewhere
  exp.methods = ml_collections.ConfigDict(dict(pn_fit=exp.methods.pn_fit))
  exp.time_references = ml_collections.ConfigDict(dict(slm=("configs/slm.py:tiny", "")))
  os.rename(tmp_path / "step_costs.json", tmp_path / "elsewhere.json")
  exp.step_costs = str(tmp_path / "elsewhere.json")
  assert experiment.pretrain_config(exp, spec, overrides, "corpus", "tok", root).train.steps == 25


def test_fitting_without_a_measurement_or_to_an_unknown_run_is_refused(tmp_path):
  from pn_jax import experiment
  exp = _exp()
  spec, overrides, _ = experiment.method_spec(exp, "pn_fit")
  _costs_file(tmp_path / "step_costs.json", exp, {"slm": 1.0})  # pn's step never timed
  with pytest.raises(ConfigError, match=r"no measured step cost.*launch/step_costs.py"):
    experiment.pretrain_config(exp, spec, overrides, "corpus", "tok", str(tmp_path))
  _costs_file(tmp_path / "step_costs.json", exp, {"slm": 1.0, "pn_fit": 2.0}, device="H200")
  with pytest.raises(ConfigError, match=r"measured on \['H200'\], this run is on 'cpu'"):
    experiment.pretrain_config(exp, spec, overrides, "corpus", "tok", str(tmp_path))
  (tmp_path / "step_costs.json").write_text("{not json")
  with pytest.raises(ConfigError, match="step costs file .* is unreadable"):
    experiment.pretrain_config(exp, spec, overrides, "corpus", "tok", str(tmp_path))
  exp.methods.pn_fit = (spec, PN + ",pretrain_scale=time:nope")
  with pytest.raises(ConfigError, match=r"exp.methods.pn_fit .*time:nope.*\['pn', 'pn_fit'"):
    experiment.check_experiment(exp)  # before any stage runs
  exp.methods.pn_fit2 = (spec, PN + ",pretrain_scale=time:pn_fit")  # fitted to a fitted run
  exp.methods.pn_fit = (spec, PN + ",pretrain_scale=time:slm")
  with pytest.raises(ConfigError, match="exp.methods.pn_fit2 .*not fitted itself"):
    experiment.check_experiment(exp)


def test_the_equal_time_view_compares_a_fitted_run_whole(tmp_path):
  """Its own logged seconds (a neighbour on the GPU may have slowed it) do not send it back to
  a milestone: its length was fitted from the costs timed alone."""
  from pn_jax import experiment
  exp = _exp()
  seconds = {"slm": 1.0, "pn": 2.0, "pn_fit": 2.2}  # pn_fit: 10% over the SLM's total
  steps = {"slm": 40, "pn": 40, "pn_fit": 20}
  results = {"pretrain": {n: {"steps": s} for n, s in steps.items()}}
  for name, n in steps.items():
    os.makedirs(tmp_path / "pretrain" / name)
    points = experiment.milestone_steps(n, exp.milestones)[1]
    with open(tmp_path / "pretrain" / name / "costs.json", "w") as f:
      json.dump({"steps": {str(p): {"train_seconds": seconds[name] * p, "flops": p}
                           for p in points}}, f)
  chosen = experiment.equal_time_choice(exp, results, str(tmp_path))["methods"]
  assert chosen["slm"]["step"] == 40 and chosen["pn"]["step"] == 20  # pn: its half milestone
  assert chosen["pn_fit"] == {"step": 20, "final": True, "seconds": 44.0, "flops": 20,
                              "generic_valid_ppl": None, "over_budget": False, "fitted": True}
  assert not chosen["pn"]["fitted"]


def test_measuring_times_each_architecture_once_and_keeps_what_is_there(tmp_path, monkeypatch):
  """launch/step_costs.py on the CPU: the real bench step for each config not measured yet."""
  import sys
  sys.path.insert(0, str(REPO / "launch"))
  import step_costs as launcher
  from pn_jax import bench, experiment, step_costs
  exp_file = tmp_path / "exp.py"
  exp_file.write_text(
      "import sys\nsys.path.insert(0, 'tests')\nimport test_step_costs\n"
      "def get_config(arg=None):\n  return test_step_costs._exp()\n")
  out = tmp_path / "costs" / "step_costs.json"
  monkeypatch.chdir(REPO)
  assert launcher.main([str(exp_file), str(exp_file), f"--out={out}", "--steps=2"]) == 0
  costs = json.loads(out.read_text())
  assert sorted(v["method"].rpartition("/")[2] for v in costs.values()) == ["pn_fit", "slm"]
  assert all(v["step_seconds"] > 0 for v in costs.values())
  timed = []
  monkeypatch.setattr(bench, "bench_one", lambda c: timed.append(c) or {})
  assert step_costs.measure(experiment.step_cost_configs(_exp()), str(out)) == costs
  assert timed == []  # nothing new to time
  moved = {k: dict(v, device="H200") for k, v in costs.items()}  # measured on another device
  out.write_text(json.dumps(moved))
  monkeypatch.setattr(bench, "bench_one", lambda c: timed.append(c) or {
      "step_time_pipelined_s": 1.0, "step_time_s": 1.0, "device_kind": "cpu",
      "tokens_per_s": 1.0})
  again = step_costs.measure(experiment.step_cost_configs(_exp()), str(out))
  assert len(timed) == 2 and {v["device"] for v in again.values()} == {"cpu"}
  out.write_text("[1, 2")
  assert launcher.main([str(exp_file), f"--out={out}"]) == 2  # one error line, not a traceback
