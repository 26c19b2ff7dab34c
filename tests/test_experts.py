"""SLM-mix as k independent small models: no coupling between experts (gradients, optimizer),
projection = slicing, stratified batches, and pretrain -> specialize end to end."""

import collections
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import (copy_workdir, eval_batches, load_config, offset_params, quiet, random_batch,
                      train_batches)
from pn_jax import modes, saved_run
from pn_jax.config import ConfigError, routed, small_model_config, validate
from pn_jax.data import DataError, batches, packing, pipeline
from pn_jax.model import build_model
from pn_jax.model.independent_experts import IndependentLM
from pn_jax.model.transformer import init_params
from pn_jax.modes.pretrain import pretrain
from pn_jax.modes.specialize import open_specialize_run, pick_expert
from pn_jax.parallel import mesh as mesh_lib
from pn_jax.specialize.project import project
from pn_jax.train.optimizer import make_optimizer
from pn_jax.train.state import TrainState, create_state
from pn_jax.train.compile import step_options
from pn_jax.train.step import loss_fn, make_train_step

DOMAIN = "legal"


def _batch(config, seed=0):
  """Random tokens, stratified by expert (slot c = cluster c)."""
  return random_batch(config, seed, batches.stratified_clusters(config.data.batch_size,
                                                                config.model.k))


def _expert(tree, c):
  return jax.tree.map(lambda x: x[c], tree)


# --- config ------------------------------------------------------------------------------------

def test_mix_config_is_independent_and_shared_variant_is_the_mixture():
  mix, shared = load_config("mix"), load_config("mix_shared")
  assert mix.model.independent_experts and mix.model.mlp_kind == "dense" and mix.model.k == 4
  assert mix.data.cluster_batching == "stratified" and mix.data.batch_size % mix.model.k == 0
  assert shared.model.mlp_kind == "mixture" and not shared.model.independent_experts
  full = load_config("mix", "")
  assert full.model.k == 16 and full.data.batch_size % 16 == 0
  validate(full, device_count=8)
  assert routed(mix.model) and routed(shared.model) and not routed(load_config("slm").model)
  small = small_model_config(mix.model)
  assert not small.independent_experts and small.k == 1 and not routed(small)
  old = mix.model.to_dict()
  old.pop("independent_experts")  # a config saved before the key existed
  assert not routed(type(mix.model)(dict(old, mlp_kind="dense")))


@pytest.mark.parametrize("change,key", [
    (dict(mlp_kind="projected"), "model.independent_experts"),
    (dict(k=1), "model.independent_experts"),
    (dict(cluster_batching="mixed"), "data.cluster_batching"),
    (dict(batch_size=6), "data.batch_size"),
    (dict(cluster_batching="bogus"), "data.cluster_batching"),
])
def test_bad_independent_configs_name_the_key(change, key):
  config = load_config("mix")
  for name, value in change.items():
    (config.data if name in config.data else config.model)[name] = value
  with pytest.raises(ConfigError, match=rf"config\.{key}:"):
    validate(config)


# --- independence ------------------------------------------------------------------------------

def test_gradient_of_one_experts_rows_reaches_only_that_expert():
  config = load_config("mix")
  model = build_model(config.model)
  assert isinstance(model, IndependentLM)
  params = offset_params(model)
  batch = _batch(config)
  b = config.data.batch_size // config.model.k
  grad = jax.jit(jax.grad(lambda p, bt: loss_fn(p, bt, model=model, one_cluster=False,
                                                logits_chunk=config.model.logits_chunk)[0]))
  for i in (0, 2):
    mask = np.zeros_like(batch["mask"])
    mask[i * b:(i + 1) * b] = 1.0
    g = grad(params, dict(batch, mask=mask))
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(g)[0]]
    assert any("attn" in p for p in paths) and any("embed" in p for p in paths)
    assert any("norm" in p for p in paths)
    for j in range(config.model.k):
      norms = [float(jnp.abs(leaf[j]).max()) for leaf in jax.tree.leaves(g)]
      if j == i:
        assert min(norms) > 0, norms
      else:
        assert max(norms) == 0.0, (i, j, norms)


def test_train_step_leaves_other_experts_bit_identical():
  """Two batches that differ only in expert i's rows: every other expert's new params and
  optimizer state are bit-identical (a global-norm clip would couple them)."""
  config = load_config("mix")
  config.optim.update(warmup_steps=0, clip_norm=1e-3)  # a real update, clipping always active
  model = build_model(config.model)
  tx, schedule = make_optimizer(config)
  mesh, rules = mesh_lib.make_mesh(config), mesh_lib.logical_rules(config)
  i, b = 1, config.data.batch_size // config.model.k
  batch = _batch(config)
  other = dict(batch)
  other["inputs"] = batch["inputs"].copy()
  other["inputs"][i * b:(i + 1) * b] = (batch["inputs"][i * b:(i + 1) * b] + 1) % 100
  with mesh_lib.activate(mesh, rules):
    state, shardings = create_state(model, tx, mesh, rules, jax.random.key(0))
    step = jax.jit(make_train_step(model, tx, schedule, **step_options(config)))
    a, _ = step(state, mesh_lib.global_batch(batch, mesh))
    c, _ = step(state, mesh_lib.global_batch(other, mesh))
  a, c = jax.device_get((a, c))
  for j in range(config.model.k):
    same = jax.tree.map(np.array_equal, _expert(a.params, j), _expert(c.params, j))
    same_opt = jax.tree.map(np.array_equal, _expert(a.opt_state, j), _expert(c.opt_state, j))
    if j == i:
      assert not all(jax.tree.leaves(same))
    else:
      assert all(jax.tree.leaves(same)) and all(jax.tree.leaves(same_opt)), j
  before = jax.device_get(state.params)
  for j in range(config.model.k):  # every expert moved
    assert not np.array_equal(a.params["experts"]["embed"][j], before["experts"]["embed"][j])


def test_nan_skip_is_per_expert():
  """nan_policy='skip': an expert whose gradient is non-finite keeps its params; the others
  still update, and the skip counter has one entry per expert."""
  config = load_config("mix")
  config.optim.warmup_steps = 0
  config.train.nan_policy = "skip"
  model = build_model(config.model)
  tx, schedule = make_optimizer(config)
  params = jax.tree.map(np.array, offset_params(model))  # writable host copies
  params["experts"]["final_norm"]["scale"][2] = np.nan
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))
  new, _ = jax.jit(make_train_step(model, tx, schedule, **step_options(config)))(state, _batch(config))
  np.testing.assert_array_equal(new.opt_state.total_notfinite, [0, 0, 1, 0])
  np.testing.assert_array_equal(new.params["experts"]["embed"][2], params["experts"]["embed"][2])
  assert not np.array_equal(new.params["experts"]["embed"][0], params["experts"]["embed"][0])


# --- projection --------------------------------------------------------------------------------

def test_projected_expert_equals_its_rows_of_the_mixture():
  config = load_config("mix")
  model = build_model(config.model)
  params = offset_params(model)
  tokens = _batch(config)["inputs"][:, :32]
  b = tokens.shape[0] // config.model.k
  logits = jax.jit(model.apply)({"params": params}, tokens)
  dense_apply = None
  outs = []
  for i in range(config.model.k):
    dense, small_cfg = project(params, config.model, i)
    assert small_cfg.mlp_kind == "dense" and not routed(small_cfg)
    small = build_model(small_cfg)
    dense_apply = dense_apply or jax.jit(small.apply)
    got = dense_apply({"params": dense}, tokens[i * b:(i + 1) * b])
    np.testing.assert_allclose(got, logits[i * b:(i + 1) * b], atol=2e-5, rtol=2e-5)
    outs.append(dense_apply({"params": dense}, tokens[:b]))
    shapes = jax.tree.map(jnp.shape, nn.unbox(jax.eval_shape(
        lambda r: init_params(small, r), jax.random.key(0))))
    assert jax.tree.map(jnp.shape, dense) == shapes
  assert float(jnp.max(jnp.abs(outs[0] - outs[1]))) > 1e-3  # the experts really differ
  with pytest.raises(ValueError, match="out of range"):
    project(params, config.model, config.model.k)


# --- stratified batches ------------------------------------------------------------------------

def test_stratified_plan_holds_each_sequence_once_in_its_slot():
  cluster = np.repeat(np.arange(3), [5, 1, 0])
  plan = batches.batch_plan(cluster, 6, "stratified", np.random.default_rng(0), num_clusters=3)
  assert plan.shape == (3, 6)  # ceil(5 / 2) batches of 3 slots x 2 rows
  for c in range(3):
    slot = plan[:, 2 * c:2 * c + 2].ravel()
    real = slot[slot >= 0]
    assert sorted(real.tolist()) == np.flatnonzero(cluster == c).tolist()
  with pytest.raises(DataError, match="batch_size=5"):
    batches.batch_plan(cluster, 5, "stratified", None, num_clusters=3)


@pytest.fixture(scope="module")
def mix_data(prepared, tmp_path_factory):
  config = load_config("mix")
  config.data.batch_size = 32  # b = 8 rows per expert: fewer steps per cluster epoch
  workdir = copy_workdir(prepared, tmp_path_factory.mktemp("mixdata"))
  return config, pipeline.prepare_run_data(config, workdir, progress=False)


def _rows(batch):
  return [r.tobytes() for r in batch["inputs"]]


def test_stratified_training_batches_cover_each_cluster(mix_data):
  config, rd = mix_data
  k, B = config.model.k, config.data.batch_size
  b = B // k
  sizes = np.bincount(rd.train.cluster, minlength=k)
  steps = int(-(-sizes.max() // b))
  it = train_batches(config, rd)
  seen = [collections.Counter() for _ in range(k)]
  for s in range(steps):
    batch = next(it)
    np.testing.assert_array_equal(batch["cluster"], np.repeat(np.arange(k), b))
    rows = _rows(batch)
    for c in range(k):
      for j in range(b):
        if s * b + j < sizes[c]:  # index i < n_c: cluster c's first epoch
          seen[c][rows[c * b + j]] += 1
  for c in range(k):
    members = np.flatnonzero(rd.train.cluster == c)
    want = collections.Counter(_rows(batches.make_batch(rd.train, members, rd.seq_len,
                                                        rd.tokenizer.pad_id)))
    assert seen[c] == want, c


def test_stratified_resume_and_process_shards(mix_data):
  config, rd = mix_data
  it = train_batches(config, rd)
  for _ in range(3):
    next(it)
  state = it.get_state()
  want = [next(it) for _ in range(3)]
  fresh = train_batches(config, rd)
  fresh.set_state(state)
  for w in want:
    got = next(fresh)
    for key in w:
      np.testing.assert_array_equal(got[key], w[key])
  shards = [train_batches(config, rd, process_index=p, process_count=2)
            for p in range(2)]
  first = train_batches(config, rd)
  for _ in range(2):
    full, parts = next(first), [next(s) for s in shards]
    for key in full:
      np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), full[key])


def test_stratified_eval_pads_with_the_slots_cluster(mix_data):
  config, rd = mix_data
  config = config.copy_and_resolve_references()
  config.data.eval_batches = 1000
  k, b = config.model.k, config.data.batch_size // config.model.k
  packed = pipeline.packed_split(rd, "validation")
  rows = [collections.Counter() for _ in range(k)]
  for batch in eval_batches(config, rd):
    np.testing.assert_array_equal(batch["cluster"], np.repeat(np.arange(k), b))
    for c in range(k):
      real = batch["mask"][c * b:(c + 1) * b].sum(1) > 0
      rows[c].update(r for r, keep in zip(_rows({"inputs": batch["inputs"][c * b:(c + 1) * b]}),
                                          real) if keep)
  for c in range(k):
    assert sum(rows[c].values()) == int((packed.cluster == c).sum())


def test_a_cluster_without_sequences_is_a_data_error(mix_data):
  config, rd = mix_data
  keep = rd.train.cluster != 3
  train = packing.Packed(rd.train.tokens, rd.train.starts[keep], rd.train.ends[keep],
                         rd.train.cluster[keep])
  with pytest.raises(DataError, match=r"clusters \[3\].*config\.model\.k"):
    train_batches(config, dataclasses.replace(rd, train_set=train))


# --- end to end --------------------------------------------------------------------------------


def test_pretrain_and_specialize_end_to_end(prepared, tmp_path):
  pre = copy_workdir(prepared, tmp_path, "mix")
  result = pretrain(quiet(load_config("mix"), steps=4, log_every=2, eval_every=4,
                                checkpoint_every=4), pre)
  assert result["step"] == 4 and np.isfinite(result["eval_loss"])
  saved = saved_run.load_saved(pre)
  assert "independent experts" in saved.describe()

  config = load_config("finetune")
  config.init_from, config.data.domain = pre, DOMAIN
  quiet(config, steps=4, eval_every=2, checkpoint_every=2)
  out = str(tmp_path / "mix_legal")
  spec = modes.MODES["specialize"](config, out)
  run_data = saved_run.pretraining_run_data(saved)
  assert spec["pretrained_kind"] == "independent"
  assert spec["cluster"] == pipeline.domain_cluster(run_data, DOMAIN, rule="budget")
  assert np.isfinite(spec["test_ppl"]) and np.isfinite(spec["noft_test_ppl"])
  small = saved_run.load_saved(out)
  assert small.model.mlp_kind == "dense" and not routed(small.model)

  # eval mode on the mixture routes the domain to its cluster's expert: the no-ft perplexity
  ev = load_config("finetune")
  ev.data.domain = DOMAIN
  got = modes.MODES["eval"](ev, pre)
  np.testing.assert_allclose(got["perplexity"], spec["noft_test_ppl"], rtol=1e-4)

  # select=lowest_loss scores each expert as its own dense model
  sel = load_config("finetune", "tiny,select=lowest_loss")
  sel.init_from, sel.data.domain = pre, DOMAIN
  run = open_specialize_run(sel, str(tmp_path / "unwritten"))
  with mesh_lib.activate(run.mesh, run.rules):
    params = saved_run.restore_params(saved, run.mesh, run.rules)
    cluster, info = pick_expert(run, params)
  losses = info["expert_losses"]
  assert len(losses) == 4 and cluster == int(np.argmin(losses)) and np.ptp(losses) > 1e-4

  # export / sample take one expert (sample.cluster) as a dense model
  out_cfg = load_config("finetune")
  out_cfg.sample.update(cluster=1, max_new_tokens=2)
  exported = modes.MODES["export"](out_cfg, pre)
  assert exported["cluster"] == 1
  dense_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(
      project(jax.device_get(params), saved.model, 1)[0]))
  assert exported["parameters"] == dense_params
  assert len(modes.MODES["sample"](out_cfg, pre)["samples"]) == 1
