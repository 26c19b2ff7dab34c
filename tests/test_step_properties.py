"""Properties of the model and the train step (nanodo style), not plumbing: a language model
is causal, and the jitted train step computes what the traced Python does."""

import jax
import numpy as np
import pytest

from conftest import load_config, random_batch
from pn_jax.model import build_model
from pn_jax.parallel import mesh as mesh_lib
from pn_jax.train.compile import step_options
from pn_jax.train.optimizer import make_optimizer
from pn_jax.train.state import create_state
from pn_jax.train.step import make_train_step


def _one_device(kind: str):
  config = load_config(kind)
  config.mesh.update(data=1, fsdp=1, tensor=1)
  config.optim.warmup_steps = 0  # a real update at step 0
  # Adam's first update is ~lr*sign(g): for a gradient entry at rounding-noise level it depends
  # on the order of a reduction. A larger eps makes the update continuous in g.
  config.optim.eps = 1e-4
  return config, mesh_lib.make_mesh(config, jax.devices()[:1]), mesh_lib.logical_rules(config)


@pytest.mark.parametrize("kind", ["slm", "pn"])  # dense, projected
def test_logits_at_t_do_not_depend_on_later_tokens(kind):
  """Perturbing the tokens after position t leaves the logits at positions <= t unchanged and
  changes those after it (so the check can fail)."""
  config, mesh, rules = _one_device(kind)
  model = build_model(config.model)
  tx, _ = make_optimizer(config)
  batch = random_batch(config)
  T, t = config.data.seq_len, config.data.seq_len // 2
  perturbed = batch["inputs"].copy()
  perturbed[:, t + 1:] = (perturbed[:, t + 1:] + 1 + np.arange(T - t - 1)) % config.model.vocab_size
  with mesh_lib.activate(mesh, rules):
    state, _ = create_state(model, tx, mesh, rules, jax.random.key(0))
    logits = jax.jit(lambda p, x: model.apply({"params": p}, x, batch["cluster"]))
    a_BTV, b_BTV = jax.device_get((logits(state.params, batch["inputs"]),
                                   logits(state.params, perturbed)))
  np.testing.assert_allclose(b_BTV[:, :t + 1], a_BTV[:, :t + 1], atol=1e-6, rtol=1e-6)
  assert np.abs(b_BTV[:, t + 1:] - a_BTV[:, t + 1:]).max() > 1e-3


@pytest.mark.parametrize("kind", ["slm", "pn"])
def test_jitted_train_step_equals_the_unjitted_one(kind):
  config, mesh, rules = _one_device(kind)
  model = build_model(config.model)
  tx, schedule = make_optimizer(config)
  step = make_train_step(model, tx, schedule, **step_options(config))
  with mesh_lib.activate(mesh, rules):
    state, _ = create_state(model, tx, mesh, rules, jax.random.key(0))
    batch = mesh_lib.global_batch(random_batch(config), mesh)
    with jax.disable_jit():
      eager = jax.device_get(step(state, batch))
    jitted = jax.device_get(jax.jit(step)(state, batch))
  (eager_state, eager_metrics), (jit_state, jit_metrics) = eager, jitted
  assert set(eager_metrics) == set(jit_metrics)
  for key in eager_metrics:
    np.testing.assert_allclose(jit_metrics[key], eager_metrics[key], rtol=1e-5, err_msg=key)
  assert int(jit_state.step) == int(eager_state.step) == 1
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5),
               jit_state.params, eager_state.params)
