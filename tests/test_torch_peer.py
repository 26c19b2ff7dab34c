"""configs/bench/torch_peer.py, the PyTorch peer of the dense bench step, trains pn-jax's model:
with pn-jax's weights loaded it computes pn-jax's loss (gpt and llama MLPs), and its JSON line
counts the same parameters and FLOPs as pn_jax.bench's."""

import importlib.util
import io
import json
from contextlib import redirect_stdout

import flax.linen as nn
import jax
import numpy as np
import pytest

from conftest import REPO, random_batch

torch = pytest.importorskip("torch")

from pn_jax.config import load_module, use_arch  # noqa: E402
from pn_jax.model import build_model  # noqa: E402
from pn_jax.model.transformer import init_params  # noqa: E402

_spec = importlib.util.spec_from_file_location("torch_peer", REPO / "configs/bench/torch_peer.py")
peer = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(peer)


def bench_config(arch: str):
  config = load_module(str(REPO / "configs/bench/gpt2_dense.py")).get_config("tiny")
  config.model.dtype = "float32"
  return use_arch(config, arch)


def load_pn_jax_params(model, params, m) -> None:
  """pn-jax's params (layers stacked on a leading axis) into the peer's torch modules."""
  t = lambda a: torch.tensor(np.asarray(a, np.float32))
  D, b = m.d_model, params["blocks"]
  with torch.no_grad():
    model.embed.weight.copy_(t(params["embed"]))
    model.final_norm.scale.copy_(t(params["final_norm"]["scale"]))
    for i, block in enumerate(model.blocks):
      attn, mlp = b["attn"], b["mlp"]
      qkv = [np.asarray(attn[n][i]).reshape(D, D).T for n in ("wq", "wk", "wv")]
      block.qkv.weight.copy_(t(np.concatenate(qkv, axis=0)))
      block.wo.weight.copy_(t(np.asarray(attn["wo"][i]).reshape(D, D).T))
      block.w_in.weight.copy_(t(np.asarray(mlp["w_in"][i]).T))
      block.w_out.weight.copy_(t(np.asarray(mlp["w_out"][i]).T))
      if block.w_gate is not None:
        block.w_gate.weight.copy_(t(np.asarray(mlp["w_gate"][i]).T))
      block.attn_norm.scale.copy_(t(b["attn_norm"]["scale"][i]))
      block.mlp_norm.scale.copy_(t(b["mlp_norm"]["scale"][i]))


@pytest.mark.parametrize("arch", ["gpt", "llama"])
def test_the_peer_computes_pn_jax_loss_with_its_weights(arch):
  config = bench_config(arch)
  model = build_model(config.model)
  params = nn.unbox(init_params(model, jax.random.PRNGKey(0)))
  batch = random_batch(config)
  logits = np.asarray(model.apply({"params": params}, batch["inputs"]), np.float64)
  logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
      - logits.max(-1, keepdims=True)
  expected = -np.take_along_axis(logp, batch["targets"][..., None], -1).mean()

  torch_model = peer.GPT(config.model)
  load_pn_jax_params(torch_model, params, config.model)
  n_jax = sum(x.size for x in jax.tree.leaves(params))
  assert sum(p.numel() for p in torch_model.parameters()) == n_jax
  got = torch_model(torch.tensor(batch["inputs"]).long(), torch.tensor(batch["targets"]).long())
  np.testing.assert_allclose(float(got.detach()), expected, rtol=1e-5)


def test_the_peer_record_matches_the_bench_accounting():
  out = io.StringIO()
  with redirect_stdout(out):
    assert peer.main(["--config=configs/bench/gpt2_dense.py:tiny", "--compile=0"]) == 0
  record = json.loads(out.getvalue().splitlines()[-1])
  from pn_jax.config import small_model_config
  from pn_jax.train import flops
  config = load_module(str(REPO / "configs/bench/gpt2_dense.py")).get_config("tiny")
  model = build_model(config.model)
  n = sum(x.size for x in jax.tree.leaves(nn.unbox(init_params(model, jax.random.PRNGKey(0)))))
  assert record["config"] == "torch_peer[gpt2_dense]" and record["params"] == n
  assert record["model_tflops_per_step"] == pytest.approx(
      flops.train_flops_per_step(small_model_config(config.model), 8, 64) / 1e12)
  assert record["step_time_s"] > 0 and np.isfinite(record["loss"]) and record["mfu"] is None
