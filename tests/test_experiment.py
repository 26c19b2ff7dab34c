"""The comparison driver end to end at toy scale: every stage runs, both views of the table and
the figure are written, adding a domain later reuses the pretraining instead of redoing it, and
a preempted stage stops the driver without being recorded."""

import copy
import json
import math
import os
import re
import signal

import ml_collections
import pytest

from conftest import REPO
from pn_jax.config import ConfigError

# Fake training seconds per pretraining step (costs.json): PN costs twice the SLM per step, so at
# the SLM's total time it affords half its steps (the milestone at 0.5).
SECONDS_PER_STEP = {"slm": 1.0, "pn": 2.0, "llm": 4.0}


def _toy_experiment():
  from pn_jax import config as config_lib
  exp = config_lib.load_config(str(REPO / "configs" / "experiments" / "cpu_small.py"))
  exp.update(source="tiny", generic_chars=200_000, heldout_chars=20_000,
             domain_train_chars=100_000, domains=("legal",), budgets=(2048, 4096),
             vocab_size=512, seq_len=64, batch_size=8, pretrain_tokens=8 * 8 * 64,
             eval_batches=2, distill=False)
  exp.methods = ml_collections.ConfigDict(dict(
      slm=("configs/slm.py:tiny", ""),
      pn=("configs/pn.py:tiny", "model.k=2,model.h=4,model.m=2")))
  exp.finetune.update(steps=4, eval_every=2, eval_batches=2)
  return exp


def _write_fake_costs(workdir, config, per_step):
  """costs.json as the training loop writes it (pn_jax.train.costs), with made-up seconds so
  the equal-time choice is deterministic."""
  t = config.train
  steps = sorted({*range(t.checkpoint_every, t.steps + 1, t.checkpoint_every), t.steps})
  costs = {"device": "fake-cpu", "device_count": 1, "steps": {
      str(s): {"train_seconds": per_step * s, "flops": 1e6 * s, "tokens": 512 * s,
               "eval_loss": 1.0, "eval_perplexity": 100.0 / s} for s in steps}}
  with open(os.path.join(workdir, "costs.json"), "w") as f:
    json.dump(costs, f)


@pytest.fixture
def fake_costs(monkeypatch):
  """The pretrain mode followed by a fake costs.json; records every specialization config."""
  from pn_jax import modes
  real_pretrain, real_specialize = modes.MODES["pretrain"], modes.MODES["specialize"]
  calls = []

  def pretrain(config, workdir):
    out = real_pretrain(config, workdir)
    _write_fake_costs(workdir, config, SECONDS_PER_STEP[os.path.basename(workdir)])
    return out

  def specialize(config, workdir):
    calls.append((workdir, config.init_step))
    return real_specialize(config, workdir)

  monkeypatch.setitem(modes.MODES, "pretrain", pretrain)
  monkeypatch.setitem(modes.MODES, "specialize", specialize)
  return calls


def stage_lines(caplog) -> list[str]:
  """The driver's `[i/n] <stage>` progress lines logged so far (then forgotten)."""
  lines = [r.getMessage() for r in caplog.records if re.match(r"\[\d+/\d+\] ", r.getMessage())]
  caplog.clear()
  return lines


def test_experiment_runs_and_adding_a_domain_reuses_pretraining(tmp_path, fake_costs, caplog):
  from pn_jax import experiment, experiment_report

  caplog.set_level("INFO", logger="absl")
  exp, root = _toy_experiment(), str(tmp_path / "exp")
  first = experiment.run(exp, root)
  # One line per stage as it starts; the equal-time stages join the count after pretraining.
  pn = "configs/pn.py:tiny model.k=2,model.h=4,model.m=2"
  assert stage_lines(caplog) == [
      f"[1/6] pretrain pn ({pn}): 8 steps", "[2/6] pretrain slm (configs/slm.py:tiny): 8 steps",
      "[3/8] specialize pn on legal at 2.05k tokens",
      "[4/8] specialize slm on legal at 2.05k tokens",
      "[5/8] specialize pn on legal at 4.1k tokens", "[6/8] specialize slm on legal at 4.1k tokens",
      "[7/8] specialize pn@4 on legal at 2.05k tokens (equal time)",
      "[8/8] specialize pn@4 on legal at 4.1k tokens (equal time)"]
  assert set(first["pretrain"]) == {"slm", "pn"}
  for budget in exp.budgets:
    cell = first["specialize"][f"legal/{budget}"]
    assert set(cell) == {"slm", "pn"}
    for result in cell.values():
      assert math.isfinite(result["test_ppl"]) and result["train_domain_tokens"] == budget
      # 4 steps, 2 evals: early stopping (patience 2) cannot end it before the cap
      assert result["hit_step_cap"] and result["pretrain_step"] is None
  # Equal time: the SLM's 8 steps cost 8 s; PN's milestone at step 4 costs 8 s.
  eq = first["equal_time"]
  assert eq["reference"] == "slm" and eq["budget_seconds"] == 8.0
  assert eq["methods"]["slm"] == dict(step=8, final=True, seconds=8.0, flops=8e6,
                                      generic_valid_ppl=12.5, over_budget=False,
                                      fitted=False)
  assert eq["methods"]["pn"]["step"] == 4 and not eq["methods"]["pn"]["final"]
  assert set(first["specialize_equal_time"]["legal/2048"]) == {"pn"}  # the SLM's is reused
  assert first["specialize_equal_time"]["legal/2048"]["pn"]["pretrain_step"] == 4
  assert sorted(step for _, step in fake_costs) == [0, 0, 0, 0, 4, 4]
  assert all("pn@4" in w for w, step in fake_costs if step == 4)
  generic = os.path.join(root, "corpus", "generic", "train.array_record")
  generic_mtime = os.path.getmtime(generic)

  exp.domains = ("legal", "religious")
  second = experiment.run(exp, root)
  # Finished stages are counted, not shown: only religious's 4 + 2 run, each budget's cells
  # before the next budget's (the smallest first: a stopped run has whole columns).
  assert [line.split("]")[0] + "]" for line in stage_lines(caplog)] == [
      "[5/14]", "[6/14]", "[9/14]", "[10/14]", "[12/14]", "[14/14]"]
  assert second["pretrain"] == json.loads(json.dumps(first["pretrain"]))  # not re-run
  assert os.path.getmtime(generic) == generic_mtime
  assert second["specialize"]["legal/2048"] == json.loads(json.dumps(first["specialize"]["legal/2048"]))
  assert set(second["specialize"]["religious/4096"]) == {"slm", "pn"}
  assert len(fake_costs) == 12  # legal's 6 cells are not run again

  exp.finetune.steps = 5  # stages made with 4 steps must not be mixed with 5-step ones
  with pytest.raises(ConfigError, match=r"other settings \(finetune: .*'steps': 4.*use a new --root"):
    experiment.run(exp, root)
  exp.finetune.steps = 4

  docs = tmp_path / "docs"
  experiment.write_report(second, exp, str(docs), "pytest", tag="toy", figure="toy.png")
  report = (docs / "results.md").read_text()
  assert "<!-- experiment toy:begin" in report and "| legal | religious |" in report
  assert (docs / "toy.png").stat().st_size > 1000
  tokens, timed = report.split("### equal pretraining device time")
  assert "### equal pretraining tokens" in tokens and "fake-cpu x1" in tokens
  assert tokens.count("| PN | 2e+03 |") == 1 and timed.count("| PN | 2e+03 |") == 1
  assert "| PN | 4 | 4.00e+06 | 8 | 25.00 |" in timed and "| SLM | 8 (final) |" in timed
  for view, text in (("tokens", tokens), ("time", timed)):
    rows = experiment_report.table_rows(second, exp, view)
    pn, slm = experiment_report.rows_by(rows, "pn"), experiment_report.rows_by(rows, "slm")
    change = 100 * (pn[4096]["macro"] / slm[4096]["macro"] - 1)
    better = sum(pn[4096]["per_domain"][d] < slm[4096]["per_domain"][d] for d in exp.domains)
    assert f"| {change:+.1f}% | {better}/2 |" in text
    assert f"| {pn[4096]['macro']:.2f}* |" in text  # the cap-hit cells are flagged
  assert "fine-tuning hit the step cap: not converged" in report
  # PN's equal-time cells come from its step-4 runs, not the equal-token ones.
  assert (experiment_report.rows_by(experiment_report.table_rows(second, exp, "time"), "pn")
          [2048]["per_domain"]["legal"]
          == second["specialize_equal_time"]["legal/2048"]["pn"]["test_ppl"])

  converged = copy.deepcopy(second)  # the same results, every run stopped early
  for view in ("specialize", "specialize_equal_time"):
    for cell in converged[view].values():
      for result in cell.values():
        result["hit_step_cap"] = False
  experiment.write_report(converged, exp, str(docs), "pytest", tag="toy", figure="toy.png")
  report = (docs / "results.md").read_text()
  assert "* |" not in report


def test_preempted_stage_stops_the_driver_and_a_rerun_completes_it(tmp_path, monkeypatch):
  """A stage that returns stop_reason SIGTERM (the mode's signal handler saved a checkpoint)
  ends the experiment with exit code 143 and is not recorded; the rerun resumes it."""
  from pn_jax import experiment, modes
  exp, root = _toy_experiment(), str(tmp_path / "exp")
  exp.methods = ml_collections.ConfigDict(dict(slm=("configs/slm.py:tiny", "")))
  exp.budgets = (2048,)
  real_pretrain, real_specialize = modes.MODES["pretrain"], modes.MODES["specialize"]

  stop = experiment.StopRequest()
  stop._handle(signal.SIGTERM, None)  # a SIGTERM between stages: nothing starts
  with pytest.raises(experiment.Preempted) as e:
    experiment.run(exp, root, stop)
  assert e.value.exit_code == 143
  assert json.load(open(os.path.join(root, "results.json")))["pretrain"] == {}

  def preempted_pretrain(config, workdir):  # stops at step 4 as SIGTERM would
    config.train.stop_at_step = 4
    return {**real_pretrain(config, workdir), "stop_reason": "SIGTERM"}

  monkeypatch.setitem(modes.MODES, "pretrain", preempted_pretrain)
  with pytest.raises(experiment.Preempted) as e:
    experiment.run(exp, root, experiment.StopRequest())
  assert e.value.exit_code == 143
  assert json.load(open(os.path.join(root, "results.json")))["pretrain"] == {}
  assert os.path.isdir(os.path.join(root, "pretrain", "slm", "checkpoints", "4"))

  monkeypatch.setitem(modes.MODES, "pretrain", real_pretrain)
  monkeypatch.setitem(modes.MODES, "specialize", lambda c, w: {"stop_reason": "SIGTERM", "step": 2})
  with pytest.raises(experiment.Preempted):
    experiment.run(exp, root, experiment.StopRequest())
  saved = json.load(open(os.path.join(root, "results.json")))
  assert saved["pretrain"]["slm"]["steps"] == 8  # resumed from step 4, finished, recorded
  assert saved["specialize"]["legal/2048"] == {}  # the preempted cell is not

  monkeypatch.setitem(modes.MODES, "specialize", real_specialize)
  done = experiment.run(exp, root, experiment.StopRequest())
  assert math.isfinite(done["specialize"]["legal/2048"]["slm"]["test_ppl"])


def test_finetune_lr_follows_the_papers_rule():
  from pn_jax import experiment
  exp = _toy_experiment()
  exp.pretrain_lr = 3e-3
  assert exp.finetune.lr == 0 and exp.finetune.full_lr_tokens == 8_000_000
  assert experiment.finetune_lr(exp, 1_000_000) == pytest.approx(1e-3)  # 1M: lr / 3
  assert experiment.finetune_lr(exp, 8_000_000) == 3e-3  # 8M and 64M: the pretraining lr
  assert experiment.finetune_lr(exp, 64_000_000) == 3e-3
  c = experiment.finetune_config(exp, "pre", "legal", 100_000, init_step=7)
  assert c.optim.lr == pytest.approx(1e-3) and c.init_step == 7
  exp.finetune.lr = 5e-4  # a positive value overrides the rule
  assert experiment.finetune_lr(exp, 64_000_000) == 5e-4


def test_equal_time_selection_picks_checkpoints_by_cost():
  from pn_jax import experiment
  costs = {"slm": {25: 10.0, 50: 20.0, 75: 30.0, 100: 40.0},
           "pn": {25: 16.0, 50: 33.0, 75: 49.0, 100: 66.0},  # 1.64x the SLM
           "mix": {25: 10.0, 50: 20.0, 75: 30.0, 100: 40.0},  # exactly the budget: final
           "llm": {25: 77.0, 50: 154.0, 75: 231.0, 100: 308.0}}  # over budget from the start
  assert experiment.equal_time_steps(costs, "slm") == {"slm": 100, "pn": 50, "mix": 100,
                                                       "llm": 25}
  assert experiment.equal_time_steps(costs, "pn")["slm"] == 100
  with pytest.raises(ConfigError, match="equal_time_reference='nope'"):
    experiment.equal_time_steps(costs, "nope")
  exp = _toy_experiment()
  exp.equal_time_reference = "nope"
  with pytest.raises(ConfigError, match=r"equal_time_reference='nope'.*\['pn', 'slm'\]"):
    experiment.run(exp, "/nonexistent/root")


def test_milestones_are_checkpointed_and_kept():
  from pn_jax import experiment
  assert experiment.milestone_steps(8, (0.25, 0.5, 0.75, 1.0)) == (2, [2, 4, 6, 8])
  assert experiment.milestone_steps(146, (0.25, 0.5, 0.75, 1.0)) == (36, [36, 72, 108, 146])
  assert experiment.milestone_steps(10, (0.5, 1.0)) == (5, [5, 10])
  with pytest.raises(ConfigError, match="exp.milestones"):
    experiment.milestone_steps(10, (0.5, 0.75))
  exp = _toy_experiment()
  exp.pretrain_tokens = 146 * exp.batch_size * exp.seq_len
  c = experiment.pretrain_config(exp, "configs/slm.py:tiny", "", "corpus", "tok")
  assert c.train.checkpoint_every == c.train.eval_every == 36
  assert c.train.keep_checkpoints >= 5  # 36, 72, 108, 144 and the final 146


def test_every_experiment_config_builds_valid_run_configs():
  """Each configs/experiments/*.py: every method's pretraining config and the fine-tuning
  configs pass the same validation the CLI applies (a typo in an override fails here, not an
  hour into the run)."""
  from pn_jax import config as config_lib
  from pn_jax import experiment
  files = sorted((REPO / "configs" / "experiments").glob("*.py"))
  assert len(files) >= 2
  gpu_small = str(REPO / "configs" / "experiments" / "gpu_small.py")
  gpu_parts = [f":{part}" for part in config_lib.load_module(gpu_small).PARTS if part]
  gpu_parts.append(":validate")
  assert len(gpu_parts) >= 20  # every part of the GPU comparison, the ones not run yet too
  cpu_small = str(REPO / "configs" / "experiments" / "cpu_small.py")
  cpu_parts = [cpu_small + ":codes", cpu_small + ":tiny"]  # :tiny: the README walk's
  for path in [str(f) for f in files] + [gpu_small + part for part in gpu_parts] + cpu_parts:
    exp = config_lib.load_config(path)
    experiment.check_experiment(exp)  # what the driver checks before its first stage
    for name in exp.methods:
      spec, overrides, finetune = experiment.method_spec(exp, name)
      c = experiment.pretrain_config(exp, spec, overrides, "corpus", "tokenizer.model")
      config_lib.validate(c, device_count=1)
      assert c.train.steps * exp.batch_size * exp.seq_len <= exp.pretrain_tokens, (path, name)
      for teacher in ("", "teacher_dir"):
        c = experiment.finetune_config(exp, "pretrain_dir", exp.domains[0], exp.budgets[0],
                                       teacher, overrides=finetune)
        config_lib.validate(c, device_count=1)


def test_a_budget_larger_than_a_domain_skips_its_cells(tmp_path):
  """The 8M column holds only the domains with 8M training tokens: its macro average and its
  domains-won count are over those, and the per-domain table shows '-' for the others."""
  from pn_jax import experiment_report as report
  exp = _toy_experiment()
  exp.domains, exp.budgets = ("legal", "religious"), (100, 1000)
  cell = lambda ppl: {"test_ppl": ppl, "noft_test_ppl": 2 * ppl, "specialize_flops": 1.0,
                      "fit_seconds": 1.0, "steps": 2, "hit_step_cap": False}
  results = {"domain_train_tokens": {"legal": 5000, "religious": 500}, "specialize": {
      "legal/100": {"slm": cell(10.0), "pn": cell(9.0)},
      "religious/100": {"slm": cell(20.0), "pn": cell(22.0)},
      "legal/1000": {"slm": cell(8.0), "pn": cell(7.0)}}}
  assert report.budget_domains(results, exp, 1000) == ["legal"]
  rows = report.table_rows(results, exp)
  pn = report.rows_by(rows, "pn")
  assert pn[1000]["per_domain"] == {"legal": 7.0}
  assert math.isclose(pn[100]["macro"], math.sqrt(9.0 * 22.0))
  assert "| PN | 1e+03 | 7.00 | - |" in report.per_domain_table(rows, exp)
  assert "| PN | -0.5% | 1/2 | -12.5% | 1/1 |" in report.vs_slm_table(rows, exp)
  exp.budgets = (100, 1000, 10_000)  # no domain holds 10k tokens: no column, no nan
  results["pretrain"] = {m: {"flops": 1.0, "seconds": 1.0, "generic_valid_ppl": 30.0}
                         for m in ("slm", "pn")}
  report.write_report(results, exp, str(tmp_path), "pytest", tag="t", figure="t.png")
  text = (tmp_path / "results.md").read_text()
  assert "ft 1e+03" in text and "1e+04" not in text and "nan" not in text


def test_parts_share_data_and_methods_share_pretraining(tmp_path):
  """The parts of one comparison (gpu_small and gpu_small:seeds): a method with another's
  pretraining config reuses that run and differs only in its fine-tuning overrides; a part with
  `data_root` uses the first part's corpus and tokenizer; a method's overrides win over the
  experiment's (own seed and length); the report merges the parts."""
  from pn_jax import experiment
  from pn_jax import saved_run

  exp, root = _toy_experiment(), str(tmp_path / "main")
  exp.budgets = (2048,)
  exp.equal_time_reference = ""  # no equal-time view
  pn = exp.methods.pn[1]
  exp.methods.pn_lowest = ("configs/pn.py:tiny", pn, "specialize.select=lowest_loss")
  main = experiment.run(exp, root)
  assert sorted(os.listdir(os.path.join(root, "pretrain"))) == ["pn", "slm"]
  assert main["pretrain"]["pn_lowest"] == main["pretrain"]["pn"]
  cell = main["specialize"]["legal/2048"]
  assert cell["pn"]["select"] == "frequent" and cell["pn_lowest"]["select"] == "lowest_loss"
  assert main["equal_time"] == {} and not any(main.get("specialize_equal_time", {}).values())

  part = copy.deepcopy(exp)
  part.data_root = root
  part.methods = ml_collections.ConfigDict(dict(
      slm_s1=("configs/slm.py:tiny", "seed=1,pretrain_scale=0.5")))
  seeds = experiment.run(part, str(tmp_path / "seeds"))
  assert not os.path.exists(tmp_path / "seeds" / "tokenizer.model")
  assert not os.path.exists(tmp_path / "seeds" / "corpus")
  assert seeds["pretrain"]["slm_s1"]["steps"] == 4
  assert seeds["pretrain"]["slm_s1"]["tokens"] == 4 * 8 * 64
  saved = saved_run.load_saved(str(tmp_path / "seeds" / "pretrain" / "slm_s1")).config
  assert saved.seed == 1 and saved.optim.warmup_steps == 1

  merged = experiment.merge_results(main, [experiment.load_part(exp, str(tmp_path / "seeds"))])
  assert set(merged["pretrain"]) == {"slm", "pn", "pn_lowest", "slm_s1"}
  assert set(merged["specialize"]["legal/2048"]) == {"slm", "pn", "pn_lowest", "slm_s1"}
  part.pretrain_lr = 1.0  # a part made with other settings is refused
  with open(tmp_path / "seeds" / "results.json", "w") as f:
    json.dump(dict(seeds, exp=part.to_dict()), f)
  with pytest.raises(ConfigError, match="pretrain_lr"):
    experiment.load_part(exp, str(tmp_path / "seeds"))


def test_slm_prune_is_a_method_of_the_comparison(tmp_path, fake_costs, caplog):
  """exp.prune: the LLM pruned to the SLM's widths once, after pretraining, then fine-tuned on
  every cell like a method; its cost is the LLM's pretraining plus the pruning's; it joins the
  equal-time view only through a source compared whole (the LLM here is cut mid-schedule)."""
  from pn_jax import experiment, experiment_report, saved_run

  caplog.set_level("INFO", logger="absl")
  exp, root = _toy_experiment(), str(tmp_path / "exp")
  exp.budgets = (4096,)
  exp.methods = ml_collections.ConfigDict(dict(
      slm=("configs/slm.py:tiny", ""), llm=("configs/llm.py:tiny", "")), sort_keys=False)
  exp.prune = ml_collections.ConfigDict(dict(slm_prune="llm"))
  results = experiment.run(exp, root)
  lines = stage_lines(caplog)
  assert "[3/6] prune llm into slm_prune (d_model 64, MLP 256)" in lines
  assert "[6/7] specialize slm_prune on legal at 4.1k tokens" in lines
  pruned, llm = results["pretrain"]["slm_prune"], results["pretrain"]["llm"]
  prune_json = json.load(open(os.path.join(root, "prune", "slm_prune", "prune.json")))
  assert pruned["flops"] == llm["flops"] + prune_json["flops"]
  assert pruned["train_seconds"] == llm["train_seconds"] + prune_json["seconds"]
  assert pruned["pruned_from"] == "llm" and pruned["shape"]["d_model"] == 64
  cell = results["specialize"]["legal/4096"]["slm_prune"]
  assert cell["pretrained_kind"] == "dense" and math.isfinite(cell["test_ppl"])
  model = saved_run.load_saved(os.path.join(root, "specialize", "slm_prune", "legal-4096")).model
  assert (model.d_model, model.mlp_dim) == (64, 256)
  assert "slm_prune" not in results["equal_time"]["methods"]  # the LLM's step-2 milestone
  rows = experiment_report.table_rows(results, exp)
  assert "| SLM-prune |" in "\n".join(experiment_report.cost_table(results, rows, exp, "tokens"))
  assert experiment.run(exp, root)["pretrain"]["slm_prune"] == pruned  # not redone

  # A source compared whole (fitted, or the reference) carries its pruned model into the view.
  eq = {"reference": "slm", "budget_seconds": 8.0, "methods": {"llm": dict(
      step=8, final=True, seconds=7.0, flops=5.0, generic_valid_ppl=9.0, over_budget=False,
      fitted=True)}}
  results["equal_time"] = eq
  experiment.pruned_equal_time(exp, results)
  assert eq["methods"]["slm_prune"] == dict(
      eq["methods"]["llm"], seconds=7.0 + pruned["prune_seconds"],
      flops=5.0 + pruned["prune_flops"], generic_valid_ppl=pruned["generic_valid_ppl"],
      pruned_from="llm")


@pytest.mark.parametrize("prune, problem", [
    (dict(slm_prune="lm"), r"exp.prune.slm_prune='lm': prunes a method's pretrained model"),
    (dict(slm="llm"), r"exp.prune.slm='llm': 'slm' is already a method"),
    (dict(slm_prune="pn"), r"exp.prune.slm_prune='pn': .*pruning takes a dense model"),
])
def test_bad_prune_entries_are_refused_before_any_stage(tmp_path, prune, problem):
  from pn_jax import experiment
  exp = _toy_experiment()
  exp.methods.llm = ("configs/llm.py:tiny", "")
  exp.prune = ml_collections.ConfigDict(prune)
  with pytest.raises(ConfigError, match=problem):
    experiment.run(exp, str(tmp_path / "exp"))
  assert not os.path.exists(tmp_path / "exp")


def test_method_overrides_are_typed():
  from pn_jax import config_overrides, experiment
  config = experiment.load_run_config("configs/pn.py:tiny")
  config_overrides.apply(config, "optim.decay_codes=False,model.h=6,optim.lr=0.5")
  assert config.optim.decay_codes is False and config.model.h == 6 and config.optim.lr == 0.5
  with pytest.raises(ConfigError, match=r"optim.decay_codes takes bool values \(it is False\), "
                     "not 'no'"):
    config_overrides.apply(config, "optim.decay_codes=no")


def test_pretrain_fit_reads_the_final_losses_and_skips_a_torn_line(tmp_path):
  """The train/valid gap of the report: the mean of the last 8 logged training losses and the
  last eval loss; a line torn by a kill is skipped, and a run without metrics gives {}."""
  from pn_jax import experiment
  lines = [json.dumps({"split": "train", "step": s, "loss": float(s)}) for s in range(1, 11)]
  lines += [json.dumps({"split": "eval", "step": 10, "loss": 2.5}), '{"split": "train", "lo']
  (tmp_path / "metrics.jsonl").write_text("\n".join(lines))
  assert experiment.pretrain_fit(str(tmp_path)) == {"train_loss_end": 6.5, "valid_loss_end": 2.5}
  assert experiment.pretrain_fit(str(tmp_path / "missing")) == {}


# --- bad input: damaged records, config typos, a moved root (issue 25, item 6) ---------------

CELL = {"test_ppl": 5.0, "noft_test_ppl": 9.0, "specialize_flops": 1.0, "fit_seconds": 1.0,
        "steps": 4, "stop_reason": "step_cap"}


@pytest.fixture
def fake_stages(monkeypatch):
  """Pretrain and specialize modes that train nothing; each call recorded as (mode, working
  directory, workdir, config.init_from)."""
  from pn_jax import modes
  calls = []

  def fake(mode, out):
    def run(config, workdir):
      calls.append((mode, os.getcwd(), workdir, config.get("init_from", "")))
      return dict(out)
    return run

  monkeypatch.setitem(modes.MODES, "pretrain", fake("pretrain", {"eval_perplexity": 30.0}))
  monkeypatch.setitem(modes.MODES, "specialize", fake("specialize", CELL))
  return calls


def _one_method(exp):
  exp.methods = ml_collections.ConfigDict(dict(slm=("configs/slm.py:tiny", "")))
  exp.budgets, exp.equal_time_reference = (2048,), ""
  return exp


@pytest.mark.parametrize("text, problem", [
    ('{"pretrain": {"slm": {"flops": 1', "cannot be read (JSONDecodeError"),
    ("", "cannot be read (JSONDecodeError"),
    ("[1, 2]", "holds [1, 2], not a results object"),
    ("{}", "holds an empty object"),
    ('{"specialize": {"legal/2048": {"slm": {"test_ppl": "x"}}}}',
     "has a malformed record: specialize['legal/2048']['slm'] has test_ppl='x', not a number"),
    ('{"specialize": {"legal/2048": [3]}}', "has specialize['legal/2048']=[3], not an object"),
], ids=["truncated", "empty", "list", "empty_object", "cell_value", "cell_list"])
def test_a_damaged_results_json_is_refused_and_kept(tmp_path, text, problem):
  """Resume, --report_only and --merge read results.json through one check: a damaged one is a
  WorkdirError naming it, what is wrong and the fix, raised before anything is written."""
  from pn_jax import experiment
  from pn_jax.train.preflight import WorkdirError
  root = tmp_path / "exp"
  root.mkdir()
  (root / "results.json").write_text(text)
  for read in (lambda: experiment.run(_one_method(_toy_experiment()), str(root)),
               lambda: experiment.read_results(str(root)),
               lambda: experiment.load_part(_toy_experiment(), str(root))):
    with pytest.raises(WorkdirError) as e:
      read()
    assert f"{root / 'results.json'} {problem}" in str(e.value)
    assert "restore it" in str(e.value) and "move it aside" in str(e.value)
  assert os.listdir(root) == ["results.json"] and (root / "results.json").read_text() == text


def test_a_damaged_results_json_is_one_error_line_from_the_command(tmp_path):
  """The command line, --report_only: exit 2, one line, no traceback, no report."""
  import subprocess
  import sys
  root = tmp_path / "exp"
  root.mkdir()
  (root / "results.json").write_text('{"pretrain": {')
  out = subprocess.run(
      [sys.executable, "-m", "pn_jax.experiment", "--config=configs/experiments/cpu_small.py",
       f"--root={root}", f"--docs={tmp_path / 'docs'}", "--report_only"], cwd=REPO,
      capture_output=True, text=True, timeout=300)
  assert out.returncode == 2, out.stderr[-3000:]
  assert "Traceback" not in out.stderr, out.stderr[-3000:]
  last = out.stderr.strip().splitlines()[-1]
  assert last.startswith(f"error: WorkdirError: --root {root}: {root / 'results.json'} cannot "
                         "be read (JSONDecodeError"), last
  assert not (tmp_path / "docs").exists()


def test_a_torn_stage_record_is_moved_aside_and_the_stage_redone(tmp_path, fake_stages, caplog,
                                                                monkeypatch):
  """A specialize.json that is torn (or lacks what the report reads) is a cache of the stage's
  checkpoints: moved aside (never deleted), said so in one log line, the stage run again."""
  from pn_jax import experiment
  exp, root = _one_method(_toy_experiment()), tmp_path / "exp"
  monkeypatch.chdir(tmp_path)  # --root as the command's default is given: relative
  cell = root / "specialize" / "slm" / "legal-2048"
  cell.mkdir(parents=True)
  (cell / "specialize.json.damaged").write_text("an earlier one")
  (cell / "specialize.json").write_text('{"test_ppl": 4.')
  with caplog.at_level("WARNING"):
    results = experiment.run(exp, "exp")
  assert os.getcwd() == str(tmp_path)
  assert results["specialize"]["legal/2048"]["slm"]["test_ppl"] == CELL["test_ppl"]
  # Run from the root, with paths relative to it (a moved root's stages still find each other).
  assert fake_stages == [("pretrain", str(root), "pretrain/slm", ""),
                         ("specialize", str(root), "specialize/slm/legal-2048", "pretrain/slm")]
  assert (cell / "specialize.json.damaged").read_text() == "an earlier one"
  assert (cell / "specialize.json.damaged.1").read_text() == '{"test_ppl": 4.'
  moved = [r.getMessage() for r in caplog.records if "moved it to" in r.getMessage()]
  rel = os.path.join("exp", "specialize", "slm", "legal-2048", "specialize.json")
  assert moved == [f"{rel} cannot be read (JSONDecodeError: Expecting ',' delimiter: line 1 "
                   f"column 15 (char 14)): moved it to {rel}.damaged.1; redoing that stage "
                   "from its checkpoints"]


@pytest.mark.parametrize("method, match", [
    (("configs/pn.py:tiny", "model.k=2,model.kk=4"),
     r"exp.methods.pn \(pretraining config of 'configs/pn.py:tiny'\): override 'model.kk=4': "
     r"unknown config key 'model.kk'; did you mean k\?"),
    (("configs/pn.py:tiny", "model.k=two"),
     r"exp.methods.pn .*override 'model.k=two': model.k takes int values \(it is 4\), not 'two'"),
    (("configs/pn.py:tiny", "", "specialize.selct=lowest_loss"),
     r"exp.methods.pn \(fine-tuning config .*unknown config key 'specialize.selct'; did you mean "
     r"select\?"),
    (("configs/pnn.py:tiny", ""), r"exp.methods.pn .*configs/pnn.py' does not exist"),
    (("configs/pn.py:tiny", "model.h=0"), r"exp.methods.pn \(pretraining config"),
], ids=["key", "value", "finetune_key", "file", "invalid"])
def test_every_methods_config_is_checked_before_the_first_stage(tmp_path, fake_stages, method,
                                                                match):
  """A typo in the last method's config fails the experiment before the first method trains
  (or the corpus is built), naming the method and the key."""
  from pn_jax import experiment
  exp, root = _one_method(_toy_experiment()), tmp_path / "exp"
  exp.methods.pn = method
  with pytest.raises(ConfigError, match=match):
    experiment.run(exp, str(root))
  assert fake_stages == [] and not root.exists()


def test_a_moved_root_resumes_and_a_changed_stage_config_names_the_drivers_flags(tmp_path,
                                                                                monkeypatch):
  """Stages store paths relative to the root and run from it: a root moved while a pretraining
  run and then a specialization were preempted resumes both where they stopped. A stage whose
  own config changed (an edited configs/*.py) is refused with the driver's flags, and resumes
  with --allow_config_change."""
  from pn_jax import experiment, modes
  from pn_jax.train.checkpoint import CheckpointError, Checkpointer
  exp = _one_method(_toy_experiment())
  real_pretrain, real_specialize = modes.MODES["pretrain"], modes.MODES["specialize"]

  def preempted(real, step):
    def run(config, workdir, **kw):  # stops at `step` as SIGTERM would
      config.train.stop_at_step = step
      return {**real(config, workdir, **kw), "stop_reason": "SIGTERM"}
    return run

  first, moved, again = (str(tmp_path / name) for name in ("exp", "moved", "again"))
  monkeypatch.setitem(modes.MODES, "pretrain", preempted(real_pretrain, 4))
  with pytest.raises(experiment.Preempted):
    experiment.run(exp, first)
  os.rename(first, moved)

  real_load = experiment.load_run_config

  def edited(spec):  # configs/slm.py edited between the two calls
    c = real_load(spec)
    c.optim.b2 = 0.9
    return c
  monkeypatch.setattr(experiment, "load_run_config", edited)
  monkeypatch.setitem(modes.MODES, "pretrain", real_pretrain)
  with pytest.raises(ConfigError) as e:
    experiment.run(exp, moved)
  message = str(e.value)
  assert message.startswith(f"stage pretrain/slm (under --root {moved}) would resume from its "
                            "checkpoint step 4 with a config that differs from the one it was "
                            "trained with: optim.b2: 0.95 -> 0.9; restore those settings"), message
  assert "--allow_config_change to resume" in message and "--workdir" not in message
  assert "data.corpus" not in message  # the move itself is no change

  def reshaped(spec):  # a change no flag can resume: the checkpoint's arrays would not fit
    c = edited(spec)
    c.model.n_layers += 1
    return c
  monkeypatch.setattr(experiment, "load_run_config", reshaped)
  with pytest.raises(CheckpointError, match=r"^stage pretrain/slm .*--allow_config_change does "
                     r"not apply: revert model.n_layers, or move .*/moved/pretrain/slm aside"):
    experiment.run(exp, moved, allow_config_change=True)
  monkeypatch.setattr(experiment, "load_run_config", edited)

  monkeypatch.setitem(modes.MODES, "specialize", preempted(real_specialize, 2))
  with pytest.raises(experiment.Preempted):  # (the edited config from here on)
    experiment.run(exp, moved, allow_config_change=True)
  saved = json.load(open(os.path.join(moved, "results.json")))
  assert saved["pretrain"]["slm"]["steps"] == 8 and saved["root"] == moved
  cell = os.path.join("specialize", "slm", "legal-2048")
  ckpt = Checkpointer(os.path.join(moved, cell), read_only=True)
  assert ckpt.latest_step() == 2
  ckpt.close()
  os.rename(moved, again)

  monkeypatch.setitem(modes.MODES, "specialize", real_specialize)
  done = experiment.run(exp, again)
  record = done["specialize"]["legal/2048"]["slm"]
  assert math.isfinite(record["test_ppl"]) and record["steps"] == 4
  assert record["init_from"] == os.path.join(again, "pretrain", "slm")
  assert done["root"] == again and not os.path.exists(first) and not os.path.exists(moved)
