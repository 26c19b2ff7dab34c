"""SLM-d: a teacher's soft targets attached to each training batch, computed on the devices.

The teacher (a fine-tuned LLM checkpoint, its params sharded on the run's mesh) runs as its own
jitted forward on the globally sharded batch; its log-probabilities at the distillation
temperature join the batch as `teacher_logprobs` [B, T, V], a jax.Array sharded like the batch
(it never visits the host: at GPT-2 scale that would be B*T*V*4 = 6.6 GB per step), which
pn_jax.train.step.loss_fn turns into the KL term. Wrapping the iterator (rather than the train
step) keeps pn_jax.train.loop.fit unchanged (mesh.global_batch passes device arrays through),
and the wrapper forwards the grain iterator's checkpoint state, so a distillation run resumes
like any other.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp

from pn_jax.model.transformer import LM
from pn_jax.parallel import mesh as mesh_lib


class TeacherIterator:
  """Wraps a grain iterator of local batches; adds the teacher's tempered log-probs."""

  def __init__(self, inner, teacher_model: LM, teacher_params, temperature: float,
               mesh: jax.sharding.Mesh):
    self.inner, self.params, self.mesh = inner, teacher_params, mesh
    tau = float(temperature)

    def soft_targets(params, inputs_BT, cluster_B):
      logits_BTV = teacher_model.apply({"params": params}, inputs_BT, cluster_B)
      return jax.nn.log_softmax(logits_BTV.astype(jnp.float32) / tau, axis=-1)

    self._soft_targets = jax.jit(soft_targets, out_shardings=mesh_lib.batch_sharding(mesh))

  def __iter__(self):
    return self

  def __next__(self):
    batch = dict(next(self.inner))
    # Sent to the devices once: fit's global_batch passes these and the log-probs through.
    batch.update(mesh_lib.global_batch({k: batch[k] for k in ("inputs", "cluster")}, self.mesh))
    batch["teacher_logprobs"] = self._soft_targets(self.params, batch["inputs"], batch["cluster"])
    return batch

  # grain.checkpoint.CheckpointHandler protocol for non-DatasetIterator items (bytes state).
  def get_state(self) -> bytes:
    return json.dumps(self.inner.get_state()).encode()

  def set_state(self, state: bytes) -> None:
    self.inner.set_state(json.loads(state.decode()))

  def start_prefetch(self) -> None:
    if hasattr(self.inner, "start_prefetch"):
      self.inner.start_prefetch()
