"""The sample mode: text from a run's model (any kind), config.sample.*: a finished
specialization's best step, else the run's latest checkpoint (saved_run.load_result).

The sampler is pn_jax/generate.py; a PN or mixture samples the expert config.sample.cluster
through its routing, independent experts that expert's own dense model.
"""

from __future__ import annotations

import jax

from pn_jax import saved_run
from pn_jax.config import ConfigError, expert_of, validate
from pn_jax.data import tokenizer as tok_lib
from pn_jax.generate import generate
from pn_jax.model import build_model
from pn_jax.parallel import mesh as mesh_lib
from pn_jax.run import Run, open_run, tokenizer_path
from pn_jax.specialize.project import project


def sample_mode(config, workdir: str) -> dict:
  """The sample mode: config.sample.* from `workdir`'s model (any model kind)."""
  validate(config)  # the sampling flags, before a checkpoint is read
  saved = saved_run.load_result(workdir, mode="sample")
  s = config.sample
  cluster = expert_of(int(s.cluster), saved.model, saved.describe())
  if s.top_k > saved.model.vocab_size:
    raise ConfigError(f"config.sample.top_k: {s.top_k} exceeds {saved.describe()}'s vocabulary "
                      f"of {saved.model.vocab_size}; use 0 (off) or at most that")
  run = open_run(config, workdir, init_from=saved, load_data=False)
  tok = _tokenizer(run)
  prompt = [tok.bos_id] + tok.encode(s.prompt)
  new = min(int(s.max_new_tokens), saved.model.max_len - len(prompt))
  if new < 1:
    raise ConfigError(f"config.sample.prompt: {len(prompt)} tokens fill the model's max_len="
                      f"{saved.model.max_len}, leaving no room for new tokens; shorten the prompt")
  model = run.model
  with mesh_lib.activate(run.mesh, run.rules):
    params = saved_run.restore_params(saved, run.mesh, run.rules)
    if saved.model.get("independent_experts", False):  # sample the chosen expert's own SLM
      params, small = project(params, saved.model, cluster)
      model = build_model(small)
    out = generate(model, params, prompt, new_tokens=new, seed=int(config.seed),
                   temperature=s.temperature, top_k=s.top_k, top_p=s.top_p,
                   num_samples=s.num_samples, cluster=cluster)
  texts = []
  for row in jax.device_get(out):
    row = list(row[len(prompt):])
    if tok.eos_id in row:
      row = row[:row.index(tok.eos_id)]
    texts.append(s.prompt + tok.decode_continuation(prompt, row))
  for i, t in enumerate(texts):
    print(f"--- sample {i} ---\n{t}")
  return {"step": saved.step, "samples": texts}


def _tokenizer(run: Run) -> tok_lib.Tokenizer:
  """The run's tokenizer: the byte tokenizer, or the file pn_jax.run.tokenizer_path finds."""
  if run.root.config.data.tokenizer == "byte":
    return tok_lib.byte_tokenizer()
  return tok_lib.load_tokenizer(tokenizer_path(run.root, run.workdir))
