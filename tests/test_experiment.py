"""The comparison driver end to end at toy scale: every stage runs, the table and figure are
written, and adding a domain later reuses the pretraining instead of redoing it."""

import json
import math
import os

import ml_collections
import pytest

from conftest import REPO
from pn_jax.config import ConfigError


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


def test_experiment_runs_and_adding_a_domain_reuses_pretraining(tmp_path):
  from pn_jax import experiment

  exp, root = _toy_experiment(), str(tmp_path / "exp")
  first = experiment.run(exp, root)
  assert set(first["pretrain"]) == {"slm", "pn"}
  for budget in exp.budgets:
    cell = first["specialize"][f"legal/{budget}"]
    assert set(cell) == {"slm", "pn"}
    for result in cell.values():
      assert math.isfinite(result["test_ppl"]) and result["train_domain_tokens"] == budget
  generic = os.path.join(root, "corpus", "generic", "train.array_record")
  generic_mtime = os.path.getmtime(generic)

  exp.domains = ("legal", "religious")
  second = experiment.run(exp, root)
  assert second["pretrain"] == json.loads(json.dumps(first["pretrain"]))  # not re-run
  assert os.path.getmtime(generic) == generic_mtime
  assert second["specialize"]["legal/2048"] == json.loads(json.dumps(first["specialize"]["legal/2048"]))
  assert set(second["specialize"]["religious/4096"]) == {"slm", "pn"}

  exp.finetune.steps = 5  # stages made with 4 steps must not be mixed with 5-step ones
  with pytest.raises(ConfigError, match=r"other settings \(finetune: .*'steps': 4.*use a new --root"):
    experiment.run(exp, root)
  exp.finetune.steps = 4

  docs = tmp_path / "docs"
  experiment.write_report(second, exp, str(docs), "pytest", tag="toy", figure="toy.png")
  report = (docs / "results.md").read_text()
  assert "<!-- experiment toy:begin" in report and "| legal | religious |" in report
  assert report.count("| PN | 2e+03 |") == 1 and (docs / "toy.png").stat().st_size > 1000
  rows = experiment.table_rows(second, exp)
  pn, slm = experiment.rows_by(rows, "pn"), experiment.rows_by(rows, "slm")
  change = 100 * (pn[4096]["macro"] / slm[4096]["macro"] - 1)
  better = sum(pn[4096]["per_domain"][d] < slm[4096]["per_domain"][d] for d in exp.domains)
  assert f"| {change:+.1f}% | {better}/2 |" in report


def test_every_experiment_config_builds_valid_run_configs():
  """Each configs/experiments/*.py: every method's pretraining config and the fine-tuning
  configs pass the same validation the CLI applies (a typo in an override fails here, not an
  hour into the run)."""
  from pn_jax import config as config_lib
  from pn_jax import experiment
  files = sorted((REPO / "configs" / "experiments").glob("*.py"))
  assert len(files) >= 2
  for path in files:
    exp = config_lib.load_config(str(path))
    for name, (spec, overrides) in exp.methods.items():
      c = experiment.pretrain_config(exp, spec, overrides, "corpus", "tokenizer.model")
      config_lib.validate(c, device_count=1)
      assert c.train.steps * exp.batch_size * exp.seq_len <= exp.pretrain_tokens, (path, name)
    for teacher in ("", "teacher_dir"):
      c = experiment.finetune_config(exp, "pretrain_dir", exp.domains[0], exp.budgets[0], teacher)
      config_lib.validate(c, device_count=1)
