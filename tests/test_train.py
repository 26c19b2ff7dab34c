"""Training: loss goes down, resume is exact, sharded equals unsharded, checkpoints move meshes."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import REPO, copy_workdir, load_config
from pn_jax.data import pipeline
from pn_jax.model import build_model
from pn_jax.modes.pretrain import pretrain
from pn_jax.parallel import mesh as mesh_lib
from pn_jax.run import Run
from pn_jax.train import loop
from pn_jax.train.basis_moments import is_basis
from pn_jax.train.checkpoint import CheckpointError, Checkpointer
from pn_jax.train.optimizer import make_optimizer
from pn_jax.train.state import create_state, state_shardings
from pn_jax.train.compile import step_options
from pn_jax.train.step import make_eval_step, make_train_step


def small_run(config, **train):
  config.train.update(progress_bar=False, async_checkpoint=False, **train)
  return config


def final_params(workdir, config):
  model, (tx, _) = build_model(config.model), make_optimizer(config)
  mesh = mesh_lib.make_mesh(config)
  rules = mesh_lib.logical_rules(config)
  with mesh_lib.activate(mesh, rules):
    abstract, _ = state_shardings(model, tx, mesh, rules)
    return jax.device_get(Checkpointer(workdir, read_only=True).restore_params(abstract.params))


def read_metrics(workdir, split="train"):
  lines = pathlib.Path(workdir, "metrics.jsonl").read_text().splitlines()
  return [r for r in map(json.loads, lines) if r["split"] == split]


def test_loss_decreases(prepared, tmp_path):
  config = small_run(load_config("pn"), steps=60, log_every=5, eval_every=30, checkpoint_every=60)
  workdir = copy_workdir(prepared, tmp_path)
  result = pretrain(config, workdir)
  train = read_metrics(workdir)
  assert train[-1]["loss"] < train[0]["loss"] - 0.8, train
  evals = read_metrics(workdir, "eval")
  assert evals[-1]["loss"] < evals[0]["loss"], evals
  assert result["step"] == 60 and np.isfinite(result["eval_loss"])


def _config(kind):
  """'pn', 'mix', 'slm', 'pn/<optim.basis_moments>' or 'pn/<moments>/<model.basis_dtype>'."""
  kind, moments, basis_dtype = (kind.split("/") + ["", ""])[:3]
  config = load_config(kind)
  if moments:
    config.optim.basis_moments = moments
  if basis_dtype:
    config.model.basis_dtype = basis_dtype
  return config


@pytest.mark.parametrize("kind", ["pn", "mix", "pn/factored", "pn/bfloat16/bfloat16"])
def test_resume_is_exact(prepared, tmp_path, kind):
  """2N steps straight == N steps, exit, restart, N more: identical params and losses (the
  basis's factored, stochastically rounded Adam moments included, and a bfloat16 basis with
  stochastically rounded updates)."""
  n = 6
  settings = dict(steps=2 * n, log_every=1, eval_every=100, checkpoint_every=100)
  straight = copy_workdir(prepared, tmp_path, "straight")
  pretrain(small_run(_config(kind), **settings), straight)

  resumed = copy_workdir(prepared, tmp_path, "resumed")
  first = pretrain(small_run(_config(kind), stop_at_step=n, **settings), resumed)
  assert first["stopped_at"] == n
  assert Checkpointer(resumed, read_only=True).latest_step() == n
  pretrain(small_run(_config(kind), **settings), resumed)

  cfg = _config(kind)
  a, b = final_params(straight, cfg), final_params(resumed, cfg)
  jax.tree.map(np.testing.assert_array_equal, a, b)
  losses = lambda w: [r["loss"] for r in read_metrics(w)]
  assert losses(straight) == losses(resumed)


def _one_step(config, devices, batch, rng=0):
  """Init + one train step + a forward on the given devices; -> (metrics, params, logits)."""
  mesh = mesh_lib.make_mesh(config, devices)
  rules = mesh_lib.logical_rules(config)
  model = build_model(config.model)
  tx, schedule = make_optimizer(config)
  with mesh_lib.activate(mesh, rules):
    state, shardings = create_state(model, tx, mesh, rules, jax.random.key(rng))
    gbatch = mesh_lib.global_batch(batch, mesh)
    logits = jax.jit(lambda p, b: model.apply({"params": p}, b["inputs"], b["cluster"]))(
        state.params, gbatch)
    step = jax.jit(make_train_step(model, tx, schedule, **step_options(config)),
                   in_shardings=(shardings, mesh_lib.batch_sharding(mesh)))
    new_state, metrics = step(state, gbatch)
    return jax.device_get(metrics), jax.device_get(new_state.params), jax.device_get(logits)


@pytest.mark.parametrize("kind", ["pn", "mix", "slm", "pn/factored", "pn/float32/bfloat16"])
def test_sharded_equals_unsharded(kind):
  """One step on 1 device == on a 2x2x2 mesh (the factored moments' state too: its averaged
  axes are left unsharded)."""
  config = _config(kind)
  config.optim.warmup_steps = 0  # a real update at step 0
  # Adam's first update is ~lr*sign(g): for a gradient entry at rounding-noise level the sign
  # depends on reduction order. A larger eps makes the update continuous in g.
  config.optim.eps = 1e-4
  config.data.cluster_batching = "mixed"
  rng = np.random.default_rng(0)
  B, T = config.data.batch_size, config.data.seq_len
  batch = {"inputs": rng.integers(0, 512, (B, T), dtype=np.int32),
           "targets": rng.integers(0, 512, (B, T), dtype=np.int32),
           "mask": np.ones((B, T), np.float32),
           "cluster": rng.integers(0, config.model.k, (B,), dtype=np.int32)}
  config.mesh.update(data=1, fsdp=1, tensor=1)
  m1, p1, l1 = _one_step(config, jax.devices()[:1], batch)
  config.mesh.update(data=2, fsdp=2, tensor=2)
  m8, p8, l8 = _one_step(config, jax.devices()[:8], batch)
  np.testing.assert_allclose(l8, l1, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(m8["loss"], m1["loss"], rtol=1e-6)
  bf16_basis = config.model.basis_dtype == "bfloat16"
  # A bfloat16 basis's gradient is rounded to bfloat16 once per shard before the shards' sum:
  # it agrees to that rounding, and Adam's first step (~lr * sign(g)) can flip on entries near 0.
  np.testing.assert_allclose(m8["grad_norm"], m1["grad_norm"], rtol=1e-3 if bf16_basis else 1e-5)

  def close(path, a, b):
    if bf16_basis and is_basis(path):
      a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
      assert np.max(np.abs(a - b)) <= 2 * config.optim.lr and np.mean(a == b) > 0.9, path
    else:
      np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5)
  jax.tree_util.tree_map_with_path(close, p8, p1)


def test_params_are_really_sharded():
  config = load_config("pn")
  config.mesh.update(data=2, fsdp=2, tensor=2)
  mesh = mesh_lib.make_mesh(config)
  rules = mesh_lib.logical_rules(config)
  tx, _ = make_optimizer(config)
  with mesh_lib.activate(mesh, rules):
    state, _ = create_state(build_model(config.model), tx, mesh, rules, jax.random.key(0))
  T_in = state.params["blocks"]["mlp"]["T_in"]  # [L, D, F, h]: D over fsdp, F over tensor
  assert T_in.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
  shard = T_in.addressable_shards[0].data.shape
  assert shard == (T_in.shape[0], T_in.shape[1] // 2, T_in.shape[2] // 2, T_in.shape[3])


def test_restore_onto_a_different_mesh(prepared, tmp_path):
  """Saved from 8 devices (2x2x2), restored on 1: same eval loss."""
  config = small_run(load_config("pn"), steps=4, eval_every=4, checkpoint_every=4)
  config.mesh.update(data=2, fsdp=2, tensor=2)
  workdir = copy_workdir(prepared, tmp_path)
  result = pretrain(config, workdir)

  one = load_config("pn")
  one.mesh.update(data=1, fsdp=1, tensor=1)
  mesh = mesh_lib.make_mesh(one, jax.devices()[:1])
  run = Run(one, workdir, mesh, mesh_lib.logical_rules(one), build_model(one.model),
                 pipeline.prepare_run_data(one, workdir))
  tx, _ = make_optimizer(one)
  with mesh_lib.activate(mesh, run.rules):
    abstract, shardings = state_shardings(run.model, tx, mesh, run.rules)
    state, step = Checkpointer(workdir, read_only=True).restore(abstract)
    assert step == 4 and len(state.params["embed"].sharding.device_set) == 1
    ev = loop.heldout_loss(run, jax.jit(make_eval_step(run.model, logits_chunk=one.model.logits_chunk)), state.params)
  np.testing.assert_allclose(ev["loss"], result["eval_loss"], rtol=1e-5)


def test_incompatible_checkpoint_is_refused(prepared, tmp_path):
  config = small_run(load_config("pn"), steps=2, eval_every=2, checkpoint_every=2)
  workdir = copy_workdir(prepared, tmp_path)
  pretrain(config, workdir)
  other = small_run(load_config("pn", "tiny,h=4"), steps=4, eval_every=4, checkpoint_every=4)
  with pytest.raises(CheckpointError, match=r"T_in.*checkpoint \(2, 64, 256, 8\).*\(2, 64, 256, 4\)"):
    pretrain(other, workdir)


def test_cli_pretrains_writes_events_and_resumes(prepared, tmp_path):
  workdir = copy_workdir(prepared, tmp_path)
  cmd = [sys.executable, "-m", "pn_jax.main", "--config=configs/pn.py:tiny",
         f"--workdir={workdir}", "--mode=pretrain", "--config.train.steps=6",
         "--config.train.checkpoint_every=3", "--config.train.eval_every=3"]
  # As a user runs it: no JAX_PLATFORMS (jax finds the CPU itself).
  env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
  out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  assert json.loads(out.stdout.strip().splitlines()[-1])["step"] == 6
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["3", "6"]
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(os.path.join(workdir, "tb")))

  cmd[-3] = "--config.train.steps=9"
  out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "resumed from step 6" in out.stderr
  assert json.loads(out.stdout.strip().splitlines()[-1])["step"] == 9

  bad = cmd[:-3] + ["--config.model.m=99"]
  out = subprocess.run(bad, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 2 and "config.model.m: code length m=99 exceeds basis size" in out.stderr


def test_basis_lr_scale_scales_only_the_pn_basis_updates():
  """optim.basis_lr_scale multiplies the Adam updates of T_in/T_out (the same step otherwise)
  and leaves E, M, attention and embeddings alone; non-PN models refuse it."""
  from flax import linen as nn
  from pn_jax.config import ConfigError, validate
  from pn_jax.model.transformer import init_params
  config = load_config("pn")
  params = nn.unbox(init_params(build_model(config.model), jax.random.key(0)))
  grads = jax.tree.map(lambda p: 1e-2 * jax.random.normal(jax.random.key(1), p.shape), params)
  updates = {}
  for scale in (1.0, 0.25):
    config.optim.basis_lr_scale = scale
    tx, _ = make_optimizer(config)
    updates[scale], _ = tx.update(grads, tx.init(params), params)
  flat = dict(jax.tree_util.tree_flatten_with_path(updates[0.25])[0])
  for path, base in jax.tree_util.tree_flatten_with_path(updates[1.0])[0]:
    want = 0.25 if path[-1].key in ("T_in", "T_out") else 1.0
    np.testing.assert_allclose(flat[path], want * base, rtol=1e-6, atol=1e-12,
                               err_msg=jax.tree_util.keystr(path))
  assert {p[-1].key for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]} >= {
      "T_in", "T_out", "E", "M"}
  slm = load_config("slm")
  slm.optim.basis_lr_scale = 0.5
  with pytest.raises(ConfigError, match="optim.basis_lr_scale: scales a projected model"):
    validate(slm)


def test_decay_codes_false_exempts_only_E_and_M_from_weight_decay():
  """optim.decay_codes=False: with zero gradients AdamW's update is the decay alone, so E and M
  must get none while T, attention and embeddings still decay."""
  from flax import linen as nn
  from pn_jax.model.transformer import init_params
  config = load_config("pn")
  params = nn.unbox(init_params(build_model(config.model), jax.random.key(0)))
  zeros = jax.tree.map(lambda p: p * 0, params)
  flat = {}
  for decay_codes in (True, False):
    config.optim.decay_codes = decay_codes
    config.optim.warmup_steps = 0
    tx, _ = make_optimizer(config)
    updates, _ = tx.update(zeros, tx.init(params), params)
    flat[decay_codes] = {p[-1].key: u for p, u in jax.tree_util.tree_flatten_with_path(updates)[0]}
  for name in ("E", "M", "T_in", "embed"):
    assert float(np.abs(flat[True][name]).max()) > 0, name
  for name in ("E", "M"):
    assert float(np.abs(flat[False][name]).max()) == 0, name
  for name in ("T_in", "T_out", "embed"):
    np.testing.assert_array_equal(flat[False][name], flat[True][name])
