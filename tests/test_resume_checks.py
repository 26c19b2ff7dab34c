"""Stale or changed state is never reused silently (issue 12, item 3).

A workdir's tokenizer and clusters carry a record of the corpus and settings they were built
from, checked when the workdir is prepared again; a resume compares the checkpoint's saved config
with the current one (shape-changing keys refused, other keys refused unless
--allow_config_change, run-control keys allowed).
"""

import json
import os
import shutil

import pytest

from conftest import copy_workdir, load_config, snapshot, train_tiny_pn, write_small_corpus
from pn_jax.config import ConfigError
from pn_jax.data import DataError, pipeline, provenance
from pn_jax.modes.pretrain import pretrain
from pn_jax.train import resume_check
from pn_jax.train.checkpoint import CheckpointError, Checkpointer
from test_reliability import cli, run_cli




def error_line(stderr: str) -> str:
  lines = [line for line in stderr.splitlines() if line.startswith("error: ")]
  assert len(lines) == 1, stderr[-3000:]
  return lines[0]


# --- tokenizer and cluster provenance ----------------------------------------------------------

@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
  """Two small corpora whose training splits differ (B holds A's documents and more)."""
  base = tmp_path_factory.mktemp("corpora")
  return (write_small_corpus(base / "a", limit=60_000),
          write_small_corpus(base / "b", limit=120_000))


def on(corpus, **data):
  config = load_config("pn")
  config.data.update(corpus=str(corpus), **data)
  return config


def test_tokenizer_of_another_corpus_is_refused_not_reused(corpora, tmp_path):
  """The issue: a workdir prepared on a wrong corpus, rerun on the right one, kept the wrong
  corpus's tokenizer. Now: exit 2, one line naming both corpora and the fix, nothing written;
  the same corpus reuses it; deleting the named files (no checkpoint yet) rebuilds them."""
  a, b = corpora
  workdir = tmp_path / "run"
  first = pipeline.prepare_run_data(on(a), str(workdir), progress=False)
  record = provenance.TOKENIZER_RECORD
  before = snapshot(workdir, ignore=("LOCK",))

  out = run_cli(cli(workdir, f"--config.data.corpus={b}", "--config.train.steps=2"))
  assert out.returncode == 2, out.stderr[-3000:]
  line = error_line(out.stderr)
  assert line.startswith(f"error: DataError: {workdir}/tokenizer.model was trained from other "
                         f"inputs than this config asks for (corpus: {a} (train split "), line
  assert f"-> {b} (train split " in line
  assert (f"use a fresh --workdir, or (no checkpoint depends on them yet) delete "
          f"{workdir}/tokenizer.model and {workdir}/{record} and {workdir}/clusters") in line
  assert snapshot(workdir, ignore=("LOCK",)) == before
  assert (workdir / record).exists()

  again = pipeline.prepare_run_data(on(a), str(workdir), progress=False)
  assert again.tokenizer.fingerprint() == first.tokenizer.fingerprint()
  assert snapshot(workdir, ignore=("LOCK",)) == before

  for name in ("tokenizer.model", record, "clusters"):  # the recovery the error line names
    shutil.rmtree(workdir / name) if name == "clusters" else os.remove(workdir / name)
  rebuilt = pipeline.prepare_run_data(on(b), str(workdir), progress=False)
  assert rebuilt.tokenizer.fingerprint() != first.tokenizer.fingerprint()


def test_changed_tokenizer_settings_and_checkpoints_name_the_right_fix(corpora, tmp_path):
  """Another vocab_size is refused too; with a checkpoint in the workdir the fix is never to
  delete what it was trained with."""
  a, _ = corpora
  workdir = tmp_path / "run"
  pipeline.prepare_run_data(on(a), str(workdir), progress=False)
  other = on(a)
  other.model.vocab_size = 640
  with pytest.raises(DataError, match=r"\(vocab_size: 512 -> 640\); use a fresh --workdir"):
    pipeline.prepare_run_data(other, str(workdir), progress=False)
  (workdir / "checkpoints" / "20").mkdir(parents=True)
  with pytest.raises(DataError, match=r"the checkpoints in .*/checkpoints were trained with "
                     r"them: point the config back at the corpus and settings"):
    pipeline.prepare_run_data(other, str(workdir), progress=False)


def test_clusters_of_another_corpus_are_refused(corpora, tmp_path):
  """With a fixed tokenizer (tokenizer_path) only the clusters record the corpus."""
  a, b = corpora
  tok = tmp_path / "tok"
  pipeline.prepare_run_data(on(a), str(tok), progress=False)
  workdir = tmp_path / "run"
  fixed = dict(tokenizer_path=str(tok / "tokenizer.model"))
  pipeline.prepare_run_data(on(a, **fixed), str(workdir), progress=False)
  before = snapshot(workdir, ignore=("LOCK",))
  with pytest.raises(DataError, match=rf"{workdir}/clusters was fitted on another corpus than "
                     rf"this config asks for \(corpus: {a} \(train split \w+\) -> {b} "):
    pipeline.prepare_run_data(on(b, **fixed), str(workdir), progress=False)
  assert snapshot(workdir, ignore=("LOCK",)) == before


def test_workdirs_without_records_are_reused_with_a_warning(corpora, tmp_path, capsys):
  """Written before the records existed: kept working (nothing can say what they came from)."""
  a, _ = corpora
  workdir = tmp_path / "run"
  first = pipeline.prepare_run_data(on(a), str(workdir), progress=False)
  os.remove(workdir / provenance.TOKENIZER_RECORD)
  capsys.readouterr()
  again = pipeline.prepare_run_data(on(a), str(workdir), progress=False)
  assert again.tokenizer.fingerprint() == first.tokenizer.fingerprint()
  assert "tokenizer.model has no provenance record" in capsys.readouterr().err


# --- the saved config compared on resume ------------------------------------------------------

@pytest.fixture(scope="module")
def trained(prepared, tmp_path_factory):
  """A tiny PN run with its checkpoint at step 2."""
  return train_tiny_pn(prepared, tmp_path_factory.mktemp("trained"), steps=2)


def resumed(config, **train):
  config.train.update(checkpoint_every=2, eval_every=100, async_checkpoint=False, **train)
  return config


def test_changed_lr_and_activation_are_refused_then_allowed_by_the_flag(trained, tmp_path):
  """The issue: a resume accepted a changed activation or learning rate without a word. Now:
  exit 2 listing each key (train.steps, run control, is not listed), checkpoints untouched;
  with --allow_config_change it resumes and logs the keys."""
  workdir = shutil.copytree(trained, tmp_path / "run")
  before = snapshot(workdir / "checkpoints")
  flags = ["--config.optim.lr=0.001", "--config.model.activation=relu",
           "--config.train.steps=3", "--config.train.eval_every=100"]
  out = run_cli(cli(workdir, *flags))
  assert out.returncode == 2, out.stderr[-3000:]
  line = error_line(out.stderr)
  assert line.startswith(f"error: ConfigError: resuming from checkpoint step 2 in {workdir}/"
                         "checkpoints with a config that differs from the one it was trained "
                         'with: model.activation: "gelu" -> "relu"; optim.lr: 0.003 -> 0.001; '
                         "rerun with the saved values, pass --allow_config_change"), line
  assert "train.steps" not in line
  assert snapshot(workdir / "checkpoints") == before

  out = run_cli(cli(workdir, *flags, "--allow_config_change"))
  assert out.returncode == 0, out.stderr[-3000:]
  assert "resumed from step 2 " in out.stderr
  assert ('resuming from step 2 with a changed config (--allow_config_change): '
          'model.activation: "gelu" -> "relu"; optim.lr: 0.003 -> 0.001') in out.stderr
  assert Checkpointer(str(workdir), read_only=True).latest_step() == 3


def test_a_refused_resume_prepares_no_data(trained, tmp_path):
  """A changed data setting (here seq_len) is refused before the run prepares data for it: the
  workdir's data artefacts (READY.json, the packed set) are not rebuilt or added to."""
  workdir = copy_workdir(trained, tmp_path)
  config = resumed(load_config("pn"), steps=3)
  config.data.seq_len = 32
  before = snapshot(workdir, ignore=("LOCK",))
  with pytest.raises(ConfigError, match=r"data\.seq_len: 64 -> 32"):
    pretrain(config, workdir)
  assert snapshot(workdir, ignore=("LOCK",)) == before


def test_run_control_keys_resume_silently(trained, tmp_path):
  config = resumed(load_config("pn"), steps=4, log_every=1, keep_checkpoints=5,
                   progress_bar=True)
  config.mesh.update(data=2, fsdp=4)
  config.data.eval_batches = 1
  ckpt = Checkpointer(str(trained), read_only=True)
  assert resume_check.check_resume(ckpt, 2, config) == []
  config.seed = 1  # not run control: refused, or allowed and reported
  with pytest.raises(ConfigError, match=r"differs from the one it was trained with: seed: 0 -> 1;"):
    resume_check.check_resume(ckpt, 2, config)
  assert resume_check.check_resume(ckpt, 2, config, allow_change=True) == ["seed"]


def test_steps_below_the_saved_step_are_refused_naming_both(trained, tmp_path):
  """Issue 25, item 8: train.steps=1 on a run saved at step 2 returned "done" at step 2 without
  a word. It is refused, naming both steps; train.steps=2 is still a finished run."""
  workdir = copy_workdir(trained, tmp_path)
  before = snapshot(workdir, ignore=("LOCK",))
  with pytest.raises(ConfigError, match=r"^config\.train\.steps=1 is below the step of the "
                     r"checkpoint to resume from, 2 \(in .*/checkpoints\).*"
                     r"--config\.train\.steps=2 \(or more\) to resume, or use a fresh --workdir"):
    pretrain(resumed(load_config("pn"), steps=1), workdir)
  assert snapshot(workdir, ignore=("LOCK",)) == before


def test_shape_changing_key_is_refused_naming_it_even_when_allowed(trained, tmp_path):
  workdir = copy_workdir(trained, tmp_path)
  config = resumed(load_config("pn", "tiny,h=4"), steps=4)
  config.optim.lr = 1e-3  # listed with --allow_config_change, but not the cause
  with pytest.raises(CheckpointError) as e:
    pretrain(config, workdir, allow_config_change=True)
  message = str(e.value)
  assert "\n" not in message
  assert message.startswith("checkpoint step 2 (params) does not match this config's model: "
                            "model.h: 8 -> 4 changes the shapes or dtypes of the parameters or "
                            "optimizer state ("), \
      message
  assert "['T_in']: checkpoint (2, 64, 256, 8), this config (2, 64, 256, 4)" in message
  assert message.endswith("(--allow_config_change does not apply): revert model.h or use a "
                          "fresh --workdir")
  assert Checkpointer(workdir, read_only=True).latest_step() == 2

  config = resumed(load_config("pn"), steps=4, nan_policy="skip")  # adds optimizer state
  with pytest.raises(CheckpointError, match=r"^checkpoint step 2 \(opt_state\) does not match "
                     r"this config's optimizer: train.nan_policy: \"stop\" -> \"skip\" changes"):
    pretrain(config, workdir, allow_config_change=True)


def test_keys_added_by_a_newer_version_at_their_default_are_not_changes():
  """An older checkpoint's config lacks keys added since: at pn-jax's default they compare
  equal, at another value they are a change."""
  now = resume_check.as_json(load_config("slm"))
  saved = json.loads(json.dumps(now))
  del saved["model"]["code_init"], saved["optim"]["decay_codes"]
  diff = resume_check.changes(saved, now)
  assert sorted(resume_check.added_since(diff)) == ["model.code_init", "optim.decay_codes"]
  now["optim"]["decay_codes"] = not now["optim"]["decay_codes"]
  assert resume_check.added_since(resume_check.changes(saved, now)) == ["model.code_init"]


def test_a_checkpoint_saved_before_a_key_existed_still_builds_its_state():
  """The state shapes of an older checkpoint's config (no optim.basis_moments, no
  optim.decay_codes) are built with pn-jax's defaults for what it lacks, so a resume that
  changes another key gets the usual refusal, not a KeyError from the optimizer."""
  now = resume_check.as_json(load_config("pn"))
  saved = json.loads(json.dumps(now))
  del saved["optim"]["basis_moments"], saved["optim"]["decay_codes"]
  assert resume_check.state_shapes(saved) == resume_check.state_shapes(now)
  now["optim"]["basis_moments"] = "factored"
  culprits, leaves = resume_check.shape_changing(saved, now, ["optim.basis_moments"])
  assert culprits == ["optim.basis_moments"] and "opt_state" in leaves[0]
