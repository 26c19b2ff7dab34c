"""specialize: PN checkpoint -> projected small model -> fine-tuned on a domain, end to end."""

import contextlib
import json
import os
import shutil
import signal

import numpy as np
import pytest

from conftest import load_config, quiet, snapshot
from pn_jax import modes, safetensors_io, saved_run
from pn_jax.data import cache as cache_lib
from pn_jax.data import pipeline
from pn_jax.modes.pretrain import pretrain
from pn_jax.parallel import mesh as mesh_lib
from pn_jax.modes.specialize import open_specialize_run, pick_expert
from pn_jax.specialize import importance_sampling
from pn_jax.train import loop
from pn_jax.config import ConfigError, validate
from pn_jax.train.checkpoint import CheckpointError

DOMAIN = "legal"



@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
  """A tiny PN pretrained for a few steps (its workdir holds tokenizer, clusters, checkpoints at
  steps 10 and 20)."""
  workdir = str(tmp_path_factory.mktemp("pn"))
  pretrain(quiet(load_config("pn"), steps=20, eval_every=20, checkpoint_every=10), workdir)
  return workdir


@contextlib.contextmanager
def no_generic_training_set():
  """Later stages need the tokenizer and clusters only: building or reading the packed generic
  training set fails the test."""
  def forbidden(*args, **kwargs):
    raise AssertionError("the packed generic training set was built or loaded")
  with pytest.MonkeyPatch.context() as mp:
    for name in ("build_training_set", "prepare_run_data"):
      mp.setattr(pipeline, name, forbidden)
    store_load = cache_lib.ArtefactStore.load  # the packed set is read through the store only
    mp.setattr(cache_lib.ArtefactStore, "load", lambda self, stage, *a, **k: (
        forbidden() if stage == "packed" else store_load(self, stage, *a, **k)))
    yield


def finetune_config(init_from, arg="tiny", **train):
  config = load_config("finetune", arg)
  config.init_from = init_from
  config.data.domain = DOMAIN
  return quiet(config, **train)


@pytest.fixture(scope="module")
def specialized(pretrained, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("pn_legal"))
  config = finetune_config(pretrained, steps=20, eval_every=10)
  with no_generic_training_set():
    return workdir, modes.MODES["specialize"](config, workdir)


def test_specialize_end_to_end(pretrained, specialized):
  workdir, result = specialized
  # fine-tuning lowers the domain's validation loss, and the held-out test perplexity
  assert result["best_valid_loss"] < result["noft_valid_loss"] - 0.1, result
  assert result["test_ppl"] < result["noft_test_ppl"], result
  # the projection used the domain's most frequent cluster
  run_data = saved_run.pretraining_run_data(saved_run.load_saved(pretrained))
  assert result["cluster"] == pipeline.domain_cluster(run_data, DOMAIN, rule="budget")
  # the small model is its own run: dense checkpoint whose config points back at the PN
  saved = saved_run.load_saved(workdir)
  assert saved.model.mlp_kind == "dense" and saved.config.init_from == pretrained
  assert saved.step == result["steps"]
  with open(os.path.join(workdir, "specialize.json")) as f:
    summary = json.load(f)
  assert summary["test_ppl"] == pytest.approx(result["test_ppl"])
  # 20 steps, evals at 10 and 20, patience 3: the step cap ended fine-tuning
  assert (summary["stop_reason"], summary["hit_step_cap"]) == ("step_cap", True)
  assert summary["init_step"] == 20 and summary["steps"] == 20
  assert os.path.exists(os.path.join(workdir, "tokenizer.model"))


def test_projected_model_equals_pn_on_its_cluster_before_finetuning(pretrained, specialized):
  """The no-fine-tuning test perplexity of the projected small model is the PN's own perplexity
  on the domain routed to that cluster (eval mode on the pretraining checkpoint)."""
  _, result = specialized
  config = load_config("finetune")
  config.data.domain = DOMAIN
  with no_generic_training_set():
    pn = modes.MODES["eval"](config, pretrained)
  assert pn["step"] == 20
  np.testing.assert_allclose(result["noft_test_ppl"], pn["perplexity"], rtol=1e-4)
  # and eval of the specialized run reproduces its reported test perplexity
  _, spec = specialized
  got = modes.MODES["eval"](config, specialized[0])
  np.testing.assert_allclose(got["perplexity"], spec["test_ppl"], rtol=1e-5)


def test_early_stopping_ends_fine_tuning_before_the_cap(pretrained, tmp_path, monkeypatch):
  """Validation losses that only get worse after the first eval: with patience 3 the run stops
  at the 4th eval (step 8 of 20), reports step 2 as best and says the cap did not bind. Step 2
  is the result: eval, sample and export use it (the export records it), not the latest, 8."""
  losses = iter([1.0, 2.0, 3.0, 4.0])
  monkeypatch.setattr(loop, "heldout_loss_fn", lambda run, eval_step, split: (
      lambda params: {"loss": next(losses), "perplexity": 1.0, "tokens": 1.0}))
  workdir = str(tmp_path / "early")
  result = modes.MODES["specialize"](finetune_config(pretrained, steps=20, eval_every=2), workdir)
  assert (result["stop_reason"], result["hit_step_cap"]) == ("early_stopping", False)
  assert (result["steps"], result["best_step"], result["best_valid_loss"]) == (8, 2, 1.0)
  assert np.isfinite(result["test_ppl"])
  with open(os.path.join(workdir, "specialize.json")) as f:
    assert json.load(f)["hit_step_cap"] is False
  assert saved_run.load_saved(workdir).step == 8
  config = finetune_config(pretrained)
  got = modes.MODES["eval"](config, workdir)
  assert got["step"] == 2
  np.testing.assert_allclose(got["perplexity"], result["test_ppl"], rtol=1e-5)
  config.sample.update(max_new_tokens=2, num_samples=1)
  assert modes.MODES["sample"](config, workdir)["step"] == 2
  exported = modes.MODES["export"](config, workdir)
  _, params, info = safetensors_io.load(exported["export_dir"])
  assert (info["step"], info["step_chosen"]) == (2, "best_step of specialize.json")
  best = saved_run.load_saved(workdir, 2)
  want = safetensors_io.flatten(saved_run.restore_params(
      best, mesh_lib.make_mesh(best.config), mesh_lib.logical_rules(best.config)))
  params = safetensors_io.flatten(params)
  assert params.keys() == want.keys()
  assert all(np.array_equal(params[k], want[k]) for k in want)  # the step-2 weights


def test_patience_0_runs_to_the_cap_and_keeps_the_best_step(pretrained, tmp_path, monkeypatch):
  """early_stop_patience=0: never stop early, and the best eval step is still the result. The
  validation losses only get worse after the first eval (step 2): its checkpoint outlives
  keep_checkpoints=2 through a time-boxed stop at step 6 and the resume to the cap at 12."""
  losses = iter(range(1, 7))
  monkeypatch.setattr(loop, "heldout_loss_fn", lambda run, eval_step, split: (
      lambda params: {"loss": float(next(losses)), "perplexity": 1.0, "tokens": 1.0}))
  workdir = str(tmp_path / "patience0")
  settings = dict(steps=12, eval_every=2, checkpoint_every=5, keep_checkpoints=2,
                  early_stop_patience=0)
  first = modes.MODES["specialize"](finetune_config(pretrained, **settings, stop_at_step=6),
                                    workdir)
  assert first["stop_reason"] == "stop_at_step"
  result = modes.MODES["specialize"](finetune_config(pretrained, **settings), workdir)
  assert (result["stop_reason"], result["steps"], result["best_step"]) == ("step_cap", 12, 2)
  assert np.isfinite(result["test_ppl"])
  steps = sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())
  assert steps == [2, 10, 12]  # the best, and the latest two
  with pytest.raises(ConfigError, match=r"config\.train\.early_stop_patience: must be >= 0 "
                     r"\(0: never stop early; a specialization still reports its best eval "
                     r"step\), got -1"):
    validate(finetune_config(pretrained, early_stop_patience=-1))


def test_stopped_specialization_is_not_a_result_and_resumes(pretrained, specialized, tmp_path):
  """Time-boxed at step 15 (between the evals at 10 and 20): no specialize.json; the same
  command again resumes and ends exactly as the uninterrupted `specialized` run did."""
  workdir = str(tmp_path / "resumed")
  config = finetune_config(pretrained, steps=20, eval_every=10, stop_at_step=15)
  first = modes.MODES["specialize"](config, workdir)
  assert (first["stop_reason"], first["stopped_at"]) == ("stop_at_step", 15)
  assert not os.path.exists(os.path.join(workdir, "specialize.json"))
  result = modes.MODES["specialize"](finetune_config(pretrained, steps=20, eval_every=10),
                                     workdir)
  _, ref = specialized
  for key in ("steps", "best_step", "best_valid_loss", "test_ppl", "stop_reason"):
    assert result[key] == ref[key], key
  assert os.path.exists(os.path.join(workdir, "specialize.json"))


def test_init_step_picks_that_checkpoint(pretrained, specialized, tmp_path):
  config = finetune_config(pretrained, steps=2, eval_every=2)
  config.init_step = 10
  result = modes.MODES["specialize"](config, str(tmp_path / "at10"))
  assert result["init_step"] == 10
  # the projected step-10 model is not the step-20 one the `specialized` run started from
  assert result["noft_test_ppl"] > specialized[1]["noft_test_ppl"] * 1.01
  config.init_step = 7
  with pytest.raises(CheckpointError, match=r"config\.init_step=7: step 7 is not among the "
                     r"checkpoints in .*: \[10, 20\]; pick one of those steps, or 0"):
    modes.MODES["specialize"](config, str(tmp_path / "at7"))


def test_a_specialization_stays_bound_to_the_source_step_it_started_from(pretrained, tmp_path):
  """The source's latest checkpoint moves on from step 10 to 20 (as its pretraining continuing
  leaves it) between two runs of one specialization with init_step=0 (the latest): resuming the
  preempted run is refused, --allow_config_change or not, naming both steps; with init_step=10 it
  continues; and rerunning the finished one against step 20 is refused (CLI: one error line,
  exit 2) and leaves its workdir, specialize.json included, as it was."""
  from test_reliability import cli, run_cli
  source, step20 = tmp_path / "pn", os.path.join(pretrained, "checkpoints", "20")
  shutil.copytree(pretrained, source, ignore=lambda d, names: ["20"] if os.path.join(d, "20") ==
                  step20 else [])
  workdir = str(tmp_path / "spec")
  first = modes.MODES["specialize"](
      finetune_config(str(source), steps=4, eval_every=2, stop_at_step=2), workdir)
  assert first["stop_reason"] == "stop_at_step"
  shutil.copytree(step20, source / "checkpoints" / "20")  # the source advanced
  config = finetune_config(str(source), steps=4, eval_every=2)
  for allow in (False, True):
    with pytest.raises(ConfigError, match=r"holds a preempted specialization of config\.init_from"
                       r"=.* at step 10, but config\.init_step=0 \(its latest checkpoint\) is now "
                       r"step 20: resuming it would mix the two; pass --config\.init_step=10 to "
                       r"continue it, or use a fresh --workdir to specialize step 20"):
      modes.MODES["specialize"](config, workdir, allow_config_change=allow)
  config.init_step = 10
  done = modes.MODES["specialize"](config, workdir)
  assert (done["init_step"], done["steps"]) == (10, 4)
  before = snapshot(workdir)
  rerun = run_cli(cli(workdir, "--mode=specialize", f"--config.init_from={source}",
                      f"--config.data.domain={DOMAIN}", "--config.train.steps=4",
                      "--config.train.eval_every=2", config="configs/finetune.py:tiny"))
  assert rerun.returncode == 2, rerun.stderr[-3000:]
  error = [l for l in rerun.stderr.splitlines() if l.startswith("error:")]
  assert len(error) == 1 and "Traceback" not in rerun.stderr, rerun.stderr[-3000:]
  assert error[0].startswith("error: ConfigError: --workdir ") and (
      "holds a finished specialization" in error[0] and "at step 10, but config.init_step=0 "
      "(its latest checkpoint) is now step 20: rerunning it would mix the two; pass "
      "--config.init_step=10 to rerun it" in error[0]), error
  assert snapshot(workdir) == before


# Runs pn_jax.main, but once the step-3 train metrics are written, touches a marker file and
# waits until the loop's SIGTERM handler has run: the test signals a run known to be training.
PAUSE_AT_STEP_3 = """
import os, time, runpy
from pn_jax.train import loop, metrics
handled, handle, write = [], loop.StopSignal.handle, metrics.MetricWriter.write
def on_signal(self, *a):
  handle(self, *a)
  handled.append(1)
def paused(self, step, scalars, prefix="train"):
  write(self, step, scalars, prefix=prefix)
  if prefix == "train" and step == 3:
    open(os.environ["PN_TEST_MARKER"], "w").close()
    while not handled:
      time.sleep(0.01)
loop.StopSignal.handle = on_signal
metrics.MetricWriter.write = paused
runpy.run_module("pn_jax.main", run_name="__main__", alter_sys=True)
"""


def test_sigterm_during_specialize_exits_143_and_the_rerun_finishes(pretrained, specialized,
                                                                     tmp_path):
  from test_reliability import ENV, cli, latest, result_line, run_cli, start_cli, wait_for
  workdir, marker = tmp_path / "spec", tmp_path / "training"
  flags = ["--mode=specialize", f"--config.init_from={pretrained}",
           f"--config.data.domain={DOMAIN}", "--config.train.steps=20",
           "--config.train.eval_every=10", "--config.train.log_every=1",
           "--config.train.progress_bar=False"]
  proc = start_cli(cli(workdir, *flags, config="configs/finetune.py:tiny", code=PAUSE_AT_STEP_3),
                   tmp_path, env={**ENV, "PN_TEST_MARKER": str(marker)})
  try:
    wait_for(marker.exists, proc, tmp_path)
    proc.send_signal(signal.SIGTERM)
    rc = proc.wait(timeout=300)
  finally:
    if proc.poll() is None:
      proc.kill()
  err = (tmp_path / "stderr").read_text()
  assert rc == 128 + signal.SIGTERM, err[-3000:]
  stopped = result_line((tmp_path / "stdout").read_text())
  assert (stopped["stop_reason"], stopped["stopped_at"]) == ("SIGTERM", 4)
  assert latest(workdir) == 4 and not (workdir / "specialize.json").exists()

  rerun = run_cli(cli(workdir, *flags, config="configs/finetune.py:tiny"))
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert "resumed from step 4 " in rerun.stderr
  summary = json.loads((workdir / "specialize.json").read_text())
  assert result_line(rerun.stdout)["test_ppl"] == pytest.approx(summary["test_ppl"])
  assert (summary["steps"], summary["stop_reason"], summary["hit_step_cap"]) == (
      20, "step_cap", True)
  assert summary["best_step"] == specialized[1]["best_step"]


def test_dense_checkpoint_fine_tunes_and_distills(pretrained, specialized, tmp_path):
  """A dense init_from (here the specialized small model) is fine-tuned without projection;
  with a teacher (here the PN it was projected from) it trains on the distillation loss: against
  the same run with distill.weight=0 (the LM loss alone), the KL term adds to the step-1 loss
  and changes the trained model."""
  student, _ = specialized

  def distilled(weight: float, name: str):
    config = finetune_config(student, steps=2, eval_every=2, log_every=1)
    config.data.domain = "quotes"
    config.distill.update(teacher=pretrained, weight=weight)
    result = modes.MODES["specialize"](config, str(tmp_path / name))
    rows = [json.loads(l) for l in open(tmp_path / name / "metrics.jsonl")]
    return result, [r["loss"] for r in rows if r["split"] == "train"]

  distill = load_config("finetune").distill
  result, losses = distilled(distill.weight, "slmd")
  assert result["pretrained_kind"] == "dense" and "cluster" not in result
  assert result["teacher"] == pretrained and np.isfinite(result["test_ppl"])
  assert len(losses) == 2 and all(np.isfinite(losses))
  lm_only, lm_losses = distilled(0.0, "lm_only")
  assert lm_only["noft_test_ppl"] == result["noft_test_ppl"]  # the same start
  # Step 1 sees the same params and batch in both runs: the difference is w * tau^2 * KL.
  kl_term = losses[0] - (1 - distill.weight) * lm_losses[0]
  assert kl_term > 1e-3  # (0.027 here; 0 up to rounding without the term)
  assert abs(result["test_ppl"] - lm_only["test_ppl"]) > 1e-3 * lm_only["test_ppl"]


def test_lowest_loss_selection(pretrained, tmp_path):
  """select='lowest_loss' scores every expert on the domain set and takes the best."""
  config = finetune_config(pretrained, "tiny,select=lowest_loss")
  with no_generic_training_set():
    run = open_specialize_run(config, str(tmp_path / "unwritten"))
  with mesh_lib.activate(run.mesh, run.rules), no_generic_training_set():
    params = saved_run.restore_params(run.source, run.mesh, run.rules)
    cluster, info = pick_expert(run, params)
  assert not (tmp_path / "unwritten").exists()  # opening the run wrote nothing
  losses = info["expert_losses"]
  assert len(losses) == 4 and cluster == int(np.argmin(losses))
  assert max(losses) - min(losses) > 1e-3  # the experts really differ on the domain


def test_bad_checkpoints_are_refused(pretrained, tmp_path):
  with pytest.raises(CheckpointError, match="no checkpoints"):
    modes.MODES["specialize"](finetune_config(str(tmp_path / "nothing")), str(tmp_path / "a"))
  config = finetune_config(pretrained)
  config.specialize.expect_kind = "mixture"
  with pytest.raises(CheckpointError, match="mlp_kind=projected"):
    modes.MODES["specialize"](config, str(tmp_path / "b"))


def test_importance_weights_match_the_domain_histogram():
  seq_cluster = np.repeat(np.arange(4), [100, 50, 25, 25])
  domain = np.array([0.1, 0.2, 0.0, 0.7])
  probs, info = importance_sampling.sequence_probs(seq_cluster, domain)
  np.testing.assert_allclose(np.bincount(seq_cluster, weights=probs, minlength=4), domain)
  np.testing.assert_allclose(info["weights"], [0.2, 0.8, 0.0, 5.6], atol=1e-4)  # domain/generic


def test_distill_loss_is_zero_kl_against_itself():
  """KL to the student's own tempered distribution is 0; a different teacher adds a positive
  term scaled by weight * tau^2."""
  import jax
  import jax.numpy as jnp
  from pn_jax.train.step import distill_loss
  config = load_config("distill")
  tau, w = config.distill.temperature, config.distill.weight
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  hidden, unembed = jax.random.normal(k1, (2, 5, 8)), jax.random.normal(k2, (8, 11))
  logits = jnp.einsum("BTD,DV->BTV", hidden, unembed)
  batch = {"mask": jnp.ones((2, 5)), "teacher_logprobs": jax.nn.log_softmax(logits / tau)}
  np.testing.assert_allclose(distill_loss(3.0, hidden, unembed, batch, temperature=tau, weight=w), (1 - w) * 3.0,
                             rtol=1e-5)
  other = dict(batch, teacher_logprobs=jax.nn.log_softmax(jax.random.normal(k3, logits.shape)))
  assert float(distill_loss(3.0, hidden, unembed, other, temperature=tau, weight=w)) > (1 - w) * 3.0 + 0.01


def test_teacher_targets_are_computed_on_the_mesh():
  """SLM-d's soft targets: the teacher's tempered log-softmax, left on the devices sharded like
  the batch (no host round trip), and passed through unchanged by mesh.global_batch."""
  import jax
  from flax import linen as nn
  from pn_jax.model import build_model
  from pn_jax.model.transformer import init_params
  from pn_jax.specialize.distill import TeacherIterator
  config = load_config("slm")
  mesh, rules = mesh_lib.make_mesh(config), mesh_lib.logical_rules(config)
  model = build_model(config.model)
  rng = np.random.default_rng(0)
  local = [{"inputs": rng.integers(0, config.model.vocab_size, (8, 16), dtype=np.int32),
            "cluster": np.zeros(8, np.int32)} for _ in range(2)]

  class Inner:  # the grain iterator's interface as the wrapper uses it
    def __init__(self):
      self.items = iter(local)

    def __next__(self):
      return next(self.items)

  with mesh_lib.activate(mesh, rules):
    params = nn.unbox(init_params(model, jax.random.key(1)))
    teacher = TeacherIterator(Inner(), model, params, temperature=2.0, mesh=mesh)
    for want_inputs in local:
      batch = mesh_lib.global_batch(next(teacher), mesh)
      targets = batch["teacher_logprobs"]
      assert isinstance(targets, jax.Array)
      assert targets.sharding.is_equivalent_to(mesh_lib.batch_sharding(mesh), targets.ndim)
      logits = model.apply({"params": params}, want_inputs["inputs"], want_inputs["cluster"])
      want = jax.nn.log_softmax(np.asarray(logits, np.float32) / 2.0, axis=-1)
      np.testing.assert_allclose(np.asarray(targets), want, atol=1e-5)


def test_a_corrupt_source_step_points_to_init_step(pretrained, tmp_path):
  """A torn file in the source's latest step: the fix is another step of the source (which
  specialize only reads), not moving files of it aside."""
  import shutil
  from conftest import snapshot
  source = shutil.copytree(pretrained, tmp_path / "pn")
  for f in (source / "checkpoints" / "20" / "params").rglob("d/*"):
    with open(f, "r+b") as fh:
      fh.truncate(8)
  before = snapshot(source)
  with pytest.raises(CheckpointError) as err:
    modes.MODES["specialize"](finetune_config(str(source)), str(tmp_path / "pn_legal"))
  message = str(err.value)
  assert message.startswith(f"config.init_from={source}: its checkpoint step 20 is corrupt or "
                            "incomplete ("), message
  assert message.endswith("; pass --config.init_step=<an earlier good step> (e.g. "
                          "--config.init_step=10; its steps: [10])"), message
  assert "aside" not in message and snapshot(source) == before


def test_shares_selection_projects_the_domain_weighted_experts(pretrained, specialized,
                                                               tmp_path):
  """select='shares' fine-tunes from every expert averaged by the domain's cluster shares: its
  starting model differs from the most frequent expert's (the domain is spread over clusters),
  it trains, and its summary records the shares it was made from."""
  config = finetune_config(pretrained, "tiny,select=shares", steps=20, eval_every=10)
  with no_generic_training_set():
    result = modes.MODES["specialize"](config, str(tmp_path / "shares"))
  _, frequent = specialized
  assert result["select"] == "shares" and result["cluster"] == frequent["cluster"]
  hist = np.asarray(result["domain_histogram"])
  assert np.sort(hist)[-2] > 0  # a second cluster holds part of the domain
  assert result["noft_test_ppl"] != frequent["noft_test_ppl"]
  assert np.isfinite(result["test_ppl"])
