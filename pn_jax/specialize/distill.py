"""SLM-d: a teacher's soft targets attached to each training batch.

The teacher (a fine-tuned LLM checkpoint) runs on the device; its log-probabilities at the
distillation temperature travel with the batch as `teacher_logprobs` [B, T, V], which
pn_jax.train.step.loss_fn turns into the KL term. Wrapping the iterator (rather than the train
step) keeps pn_jax.train.loop.fit unchanged, and the wrapper forwards the grain iterator's
checkpoint state, so a distillation run resumes like any other.

Cost note: the soft targets are materialised per batch (B*T*V float32 on the host), fine at the
CPU/tiny scale this was run at; a GPU-scale run would compute them inside the step instead.
"""

from __future__ import annotations

import json

import jax
import numpy as np

from pn_jax.model.transformer import LM


class TeacherIterator:
  """Wraps a grain iterator of local batches; adds the teacher's tempered log-probs."""

  def __init__(self, inner, teacher_model: LM, teacher_params, temperature: float):
    self.inner = inner
    self.params = teacher_params
    tau = float(temperature)

    @jax.jit
    def soft_targets(params, inputs, cluster):
      logits = teacher_model.apply({"params": params}, inputs, cluster)
      return jax.nn.log_softmax(logits.astype(np.float32) / tau, axis=-1)

    self._soft_targets = soft_targets

  def __iter__(self):
    return self

  def __next__(self):
    batch = dict(next(self.inner))
    logprobs = self._soft_targets(self.params, batch["inputs"], batch["cluster"])
    batch["teacher_logprobs"] = np.asarray(jax.device_get(logprobs), np.float32)
    return batch

  # grain.checkpoint.CheckpointHandler protocol for non-DatasetIterator items (bytes state).
  def get_state(self) -> bytes:
    return json.dumps(self.inner.get_state()).encode()

  def set_state(self, state: bytes) -> None:
    self.inner.set_state(json.loads(state.decode()))

  def start_prefetch(self) -> None:
    if hasattr(self.inner, "start_prefetch"):
      self.inner.start_prefetch()
