"""A dense model as a Hugging Face transformers directory (`--config.export.format=hf`).

`save` writes, all at once (safetensors_io.write_export: an earlier export of this format is
replaced, anything else at the path refused):

  config.json             the transformers architecture of the model's arch (ARCHITECTURES:
                          gpt -> ArceeForCausalLM, llama -> LlamaForCausalLM), plus a "pn_jax"
                          entry: the format marker and where the weights came from
  generation_config.json  the bos/eos/pad ids
  model.safetensors       its state dict in `dtype` (float32 or bfloat16; metadata
                          {"format": "pt"}, which transformers requires)
  tokenizer.model         pn-jax's sentencepiece model, as is
  tokenizer.json          the same tokenizer for the `tokenizers` library, built from the
                          sentencepiece proto (pn_jax/data/hf_tokenizer.py): transformers loads
                          it without converting anything
  tokenizer_config.json, special_tokens_map.json, README.md

so that `AutoModelForCausalLM.from_pretrained(dir)` gives pn-jax's logits (to float32 rounding)
and `AutoTokenizer.from_pretrained(dir)` pn-jax's ids: `tok(text).input_ids` is
[bos] + pn-jax's encode(text), the prompt pn-jax's sample mode builds (tests/test_hf_export.py).
Both of pn-jax's archs have a transformers-native architecture, served as is by transformers,
vLLM and lm-evaluation-harness: llama (gated MLP) is Llama; gpt (RMSNorm, RoPE, no biases,
act(x@w_in)@w_out) is Arcee, Llama's layout with the ungated MLP (up_proj, down_proj) and a
configurable activation. This module imports neither torch nor transformers: exporting needs
neither.

Shapes: V vocab, D d_model, L layers, N heads, H head_dim, F MLP width.
"""

from __future__ import annotations

import json
import os
import shutil

import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

from pn_jax import safetensors_io
from pn_jax.config import ConfigError
from pn_jax.data import hf_tokenizer, tokenizer as tok_lib
from pn_jax.model.model_config import ModelConfig

FORMAT = "pn-jax-hf-llama/1"  # the directory's marker (its first version held Llama only)
GENERATION, README = "generation_config.json", "README.md"
FILES = (safetensors_io.WEIGHTS, safetensors_io.CONFIG, safetensors_io.TOKENIZER, GENERATION,
         README, *hf_tokenizer.FILES)
# model.activation -> transformers' hidden_act. flax's nn.gelu is the tanh approximation.
HIDDEN_ACT = {"gelu": "gelu_pytorch_tanh", "silu": "silu", "relu": "relu"}
# pn-jax arch -> (transformers architecture, model_type).
ARCHITECTURES = {"llama": ("LlamaForCausalLM", "llama"), "gpt": ("ArceeForCausalLM", "arcee")}
DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}


def check_exportable(cfg: ModelConfig, what: str = "this model") -> None:
  """ConfigError unless `cfg`'s arch has a transformers architecture. A routed model passes:
  the export mode projects it onto a cluster (same arch) before `save`."""
  if cfg.arch not in ARCHITECTURES:
    raise ConfigError(f"config.export.format: {what} has arch={cfg.arch!r}; the hf format "
                      f"exports {sorted(ARCHITECTURES)} (or use --config.export.format=pn)")


def check_dtype(dtype: str) -> None:
  if dtype not in DTYPES:
    raise ConfigError(f"config.export.dtype={dtype!r}: one of {sorted(DTYPES)}")


def state_dict(params, cfg: ModelConfig, dtype: str = "float32") -> dict[str, np.ndarray]:
  """pn-jax's params (blocks stacked on a leading L axis) -> the transformers state dict
  (Llama's; Arcee's is the same without gate_proj), in `dtype`.

  torch Linear weights are [out, in]: q_proj = wq [D, N, H] as [D, N*H], transposed (HF splits
  heads as N*H in the same order); o_proj = wo [N, H, D] as [N*H, D], transposed. pn-jax's RoPE
  is the rotate-half form with HF's frequencies, so q/k need no permutation. Tied embeddings:
  pn-jax's logits are final_norm(x) @ embed^T * D**-0.5, Llama's final_norm(x) @ embed^T, so
  D**-0.5 goes into model.norm.weight (embed_tokens is also the input embedding: unscaled);
  the scale is folded in float32, then every tensor is cast once.
  """
  check_exportable(cfg)
  check_dtype(dtype)
  if cfg.mlp_kind != "dense" or cfg.independent_experts:
    raise ValueError(f"hf_export needs a dense model (project a routed one first), got "
                     f"mlp_kind={cfg.mlp_kind!r}, independent_experts={cfg.independent_experts}")
  f32 = lambda a: np.asarray(a, np.float32)
  D, N, H = cfg.d_model, cfg.n_heads, cfg.d_model // cfg.n_heads
  b = params["blocks"]
  out = {"model.embed_tokens.weight": f32(params["embed"])}
  for i in range(cfg.n_layers):
    p = f"model.layers.{i}."
    attn, mlp = b["attn"], b["mlp"]
    for name in ("q", "k", "v"):
      out[f"{p}self_attn.{name}_proj.weight"] = f32(attn[f"w{name}"][i].reshape(D, N * H).T)
    out[f"{p}self_attn.o_proj.weight"] = f32(attn["wo"][i].reshape(N * H, D).T)
    if cfg.arch == "llama":
      out[f"{p}mlp.gate_proj.weight"] = f32(mlp["w_gate"][i].T)
    out[f"{p}mlp.up_proj.weight"] = f32(mlp["w_in"][i].T)
    out[f"{p}mlp.down_proj.weight"] = f32(mlp["w_out"][i].T)
    out[f"{p}input_layernorm.weight"] = f32(b["attn_norm"]["scale"][i])
    out[f"{p}post_attention_layernorm.weight"] = f32(b["mlp_norm"]["scale"][i])
  scale = np.asarray(params["final_norm"]["scale"], np.float32)
  if cfg.tie_embeddings:
    scale = scale * np.float32(D ** -0.5)
  else:
    out["lm_head.weight"] = f32(np.asarray(params["unembed"]).T)
  out["model.norm.weight"] = f32(scale)
  return {k: np.ascontiguousarray(v.astype(DTYPES[dtype])) for k, v in out.items()}


def hf_config(cfg: ModelConfig, tok: tok_lib.Tokenizer, metadata: dict,
              dtype: str = "float32") -> dict:
  """config.json: a LlamaConfig or ArceeConfig (the same keys; Llama's pretraining_tp aside).
  RoPE as transformers 5 reads it (rope_parameters) and as 4.x does (rope_theta); "pn_jax" holds
  the format marker, the provenance and pn-jax's model config."""
  theta = float(cfg.rope_theta)
  architecture, model_type = ARCHITECTURES[cfg.arch]
  out = {
      "architectures": [architecture], "model_type": model_type,
      "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model, "intermediate_size": cfg.mlp_dim,
      "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
      "num_key_value_heads": cfg.n_heads, "head_dim": cfg.d_model // cfg.n_heads,
      "hidden_act": HIDDEN_ACT[cfg.activation], "max_position_embeddings": cfg.max_len,
      "rms_norm_eps": float(cfg.norm_eps),
      "rope_parameters": {"rope_type": "default", "rope_theta": theta}, "rope_theta": theta,
      "tie_word_embeddings": bool(cfg.tie_embeddings), "attention_bias": False,
      "attention_dropout": 0.0, "mlp_bias": False, "use_cache": True,
      "bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id,
      "dtype": dtype,
      "pn_jax": {"format": FORMAT, **metadata, "model": cfg.to_dict()},
  }
  if model_type == "llama":
    out["pretraining_tp"] = 1
  return out


def save(out_dir: str, params, cfg: ModelConfig, *, tokenizer: str,
         metadata: dict | None = None, dtype: str = "float32") -> str:
  """Writes the directory (see the module doc). `tokenizer`: a sentencepiece model file, or
  "byte" for pn-jax's byte tokenizer (then no tokenizer.model)."""
  check_exportable(cfg)
  tok = tok_lib.load_tokenizer(tokenizer)
  tensors = state_dict(params, cfg, dtype)
  tok_files = hf_tokenizer.tokenizer_files(tok, cfg.max_len)
  config = hf_config(cfg, tok, dict(metadata or {}), dtype)

  def write(new: str) -> None:
    save_file(tensors, os.path.join(new, safetensors_io.WEIGHTS), metadata={"format": "pt"})
    generation = {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id,
                  "pad_token_id": tok.pad_id}
    for name, content in [(safetensors_io.CONFIG, config), (GENERATION, generation),
                          *tok_files.items()]:
      with open(os.path.join(new, name), "w") as f:
        json.dump(content, f, indent=1, ensure_ascii=False)
    if tok.kind != tok_lib.BYTE:
      shutil.copyfile(tok.path, os.path.join(new, safetensors_io.TOKENIZER))
    with open(os.path.join(new, README), "w") as f:
      f.write(readme(config))

  return safetensors_io.write_export(out_dir, write, FILES, FORMAT,
                                     needed=sum(t.nbytes for t in tensors.values()))


def readme(config: dict) -> str:
  meta = config["pn_jax"]
  source = ", ".join(f"{k} {meta[k]}" for k in ("source", "step", "cluster", "domain")
                     if meta.get(k) not in (None, ""))
  return (f"# pn-jax export ({FORMAT})\n\nA {config['architectures'][0]} exported by pn-jax "
          f"(`--mode=export --config.export.format=hf`) from {source or 'a pn-jax run'}.\n\n"
          "```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n"
          "tok = AutoTokenizer.from_pretrained(path)\n"
          "model = AutoModelForCausalLM.from_pretrained(path)\n"
          "ids = model.generate(**tok('Hello', return_tensors='pt'), max_new_tokens=20)\n"
          "print(tok.decode(ids[0], skip_special_tokens=True))\n```\n")
