"""A dense llama-arch model as a Hugging Face transformers directory (`--config.export.format=hf`).

`save` writes, all at once (safetensors_io.write_export: an earlier export of this format is
replaced, anything else at the path refused):

  config.json             a LlamaConfig (LlamaForCausalLM), plus a "pn_jax" entry: the format
                          marker and where the weights came from
  generation_config.json  the bos/eos/pad ids
  model.safetensors       the Llama state dict, float32 (metadata {"format": "pt"}, which
                          transformers requires)
  tokenizer.model         pn-jax's sentencepiece model, as is
  tokenizer.json          the same tokenizer for the `tokenizers` library, built here from the
                          sentencepiece proto: transformers loads it without converting anything
  tokenizer_config.json, special_tokens_map.json, README.md

so that `AutoModelForCausalLM.from_pretrained(dir)` gives pn-jax's logits (to float32 rounding)
and `AutoTokenizer.from_pretrained(dir)` pn-jax's ids: `tok(text).input_ids` is
[bos] + pn-jax's encode(text), the prompt pn-jax's sample mode builds (tests/test_hf_export.py).
Only arch="llama" has a Hugging Face architecture (the gated MLP); this module imports neither
torch nor transformers: exporting needs neither.

Shapes: V vocab, D d_model, L layers, N heads, H head_dim, F MLP width.
"""

from __future__ import annotations

import json
import os
import re
import shutil

import numpy as np
from safetensors.numpy import save_file

from pn_jax import safetensors_io
from pn_jax.config import ConfigError
from pn_jax.data import tokenizer as tok_lib
from pn_jax.model.model_config import ModelConfig

FORMAT = "pn-jax-hf-llama/1"
GENERATION, TOKENIZER_JSON = "generation_config.json", "tokenizer.json"
TOKENIZER_CONFIG, SPECIAL_TOKENS, README = ("tokenizer_config.json", "special_tokens_map.json",
                                            "README.md")
FILES = (safetensors_io.WEIGHTS, safetensors_io.CONFIG, safetensors_io.TOKENIZER, GENERATION,
         TOKENIZER_JSON, TOKENIZER_CONFIG, SPECIAL_TOKENS, README)
# model.activation -> transformers' hidden_act. flax's nn.gelu is the tanh approximation.
HIDDEN_ACT = {"gelu": "gelu_pytorch_tanh", "silu": "silu", "relu": "relu"}
SPACE = "\u2581"  # sentencepiece's whitespace symbol
# The unigram score of pieces sentencepiece never matches in text: far below any path of ordinary
# pieces (scores > -100 each), yet small enough that float64 sums over long texts stay exact
# to well under the score gaps the search compares.
UNMATCHED = -1e4


def check_llama(cfg: ModelConfig, what: str = "this model") -> None:
  """ConfigError unless `cfg` is a dense llama-arch model (the one kind with an HF architecture)."""
  if cfg.arch != "llama":
    raise ConfigError(
        f"config.export.format: {what} has arch={cfg.arch!r}, whose MLP is not gated "
        "(act(x@w_in)@w_out), so no Hugging Face architecture matches it; export it with "
        "--config.export.format=pn, or train a llama-arch model (gated MLP, what "
        "LlamaForCausalLM computes) with --config.model.arch=llama --config.model.activation=silu "
        "(config files: configs/pn.py:arch=llama, configs/slm.py:arch=llama, ...)")
  if cfg.mlp_kind != "dense" or cfg.independent_experts:
    raise ValueError(f"hf_export needs a dense model (project a routed one first), got "
                     f"mlp_kind={cfg.mlp_kind!r}, independent_experts={cfg.independent_experts}")


def state_dict(params, cfg: ModelConfig) -> dict[str, np.ndarray]:
  """pn-jax's params (blocks stacked on a leading L axis) -> LlamaForCausalLM's state dict.

  torch Linear weights are [out, in]: q_proj = wq [D, N, H] as [D, N*H], transposed (HF splits
  heads as N*H in the same order); o_proj = wo [N, H, D] as [N*H, D], transposed. pn-jax's RoPE
  is the rotate-half form with HF's frequencies, so q/k need no permutation. Tied embeddings:
  pn-jax's logits are final_norm(x) @ embed^T * D**-0.5, Llama's final_norm(x) @ embed^T, so
  D**-0.5 goes into model.norm.weight (embed_tokens is also the input embedding: unscaled).
  """
  check_llama(cfg)
  f32 = lambda a: np.ascontiguousarray(np.asarray(a, np.float32))
  D, N, H = cfg.d_model, cfg.n_heads, cfg.d_model // cfg.n_heads
  b = params["blocks"]
  out = {"model.embed_tokens.weight": f32(params["embed"])}
  for i in range(cfg.n_layers):
    p = f"model.layers.{i}."
    attn, mlp = b["attn"], b["mlp"]
    for name in ("q", "k", "v"):
      out[f"{p}self_attn.{name}_proj.weight"] = f32(attn[f"w{name}"][i].reshape(D, N * H).T)
    out[f"{p}self_attn.o_proj.weight"] = f32(attn["wo"][i].reshape(N * H, D).T)
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
  return out


def llama_config(cfg: ModelConfig, tok: tok_lib.Tokenizer, metadata: dict) -> dict:
  """config.json: a LlamaConfig. RoPE as transformers 5 reads it (rope_parameters) and as 4.x
  does (rope_theta); "pn_jax" holds the format marker, the provenance and pn-jax's model config."""
  theta = float(cfg.rope_theta)
  return {
      "architectures": ["LlamaForCausalLM"], "model_type": "llama",
      "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model, "intermediate_size": cfg.mlp_dim,
      "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
      "num_key_value_heads": cfg.n_heads, "head_dim": cfg.d_model // cfg.n_heads,
      "hidden_act": HIDDEN_ACT[cfg.activation], "max_position_embeddings": cfg.max_len,
      "rms_norm_eps": float(cfg.norm_eps),
      "rope_parameters": {"rope_type": "default", "rope_theta": theta}, "rope_theta": theta,
      "tie_word_embeddings": bool(cfg.tie_embeddings), "attention_bias": False,
      "attention_dropout": 0.0, "mlp_bias": False, "pretraining_tp": 1, "use_cache": True,
      "bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id,
      "dtype": "float32",
      "pn_jax": {"format": FORMAT, **metadata, "model": cfg.to_dict()},
  }


def save(out_dir: str, params, cfg: ModelConfig, *, tokenizer: str,
         metadata: dict | None = None) -> str:
  """Writes the directory (see the module doc). `tokenizer`: a sentencepiece model file, or
  "byte" for pn-jax's byte tokenizer (then no tokenizer.model)."""
  check_llama(cfg)
  tok = tok_lib.load_tokenizer(tokenizer)
  tensors = state_dict(params, cfg)
  tok_files = tokenizer_files(tok, cfg.max_len)
  config = llama_config(cfg, tok, dict(metadata or {}))

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

  return safetensors_io.write_export(out_dir, write, FILES, FORMAT)


def readme(config: dict) -> str:
  meta = config["pn_jax"]
  source = ", ".join(f"{k} {meta[k]}" for k in ("source", "step", "cluster", "domain")
                     if meta.get(k) not in (None, ""))
  return (f"# pn-jax export ({FORMAT})\n\nA LlamaForCausalLM exported by pn-jax "
          f"(`--mode=export --config.export.format=hf`) from {source or 'a pn-jax run'}.\n\n"
          "```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n"
          "tok = AutoTokenizer.from_pretrained(path)\n"
          "model = AutoModelForCausalLM.from_pretrained(path)\n"
          "ids = model.generate(**tok('Hello', return_tensors='pt'), max_new_tokens=20)\n"
          "print(tok.decode(ids[0], skip_special_tokens=True))\n```\n")


# --- tokenizer ------------------------------------------------------------------------------
def tokenizer_files(tok: tok_lib.Tokenizer, max_len: int) -> dict[str, dict]:
  """tokenizer.json (when `tokenizers` can express the model: pn-jax's unigram sentencepiece
  models and the byte tokenizer), tokenizer_config.json, special_tokens_map.json.

  tokenizer_class PreTrainedTokenizerFast: transformers 4 and 5 (which maps it to
  TokenizersBackend) then take tokenizer.json as it is. Without one (a BPE sentencepiece model
  given as data.tokenizer_path) transformers 5 converts tokenizer.model when loading; "legacy"
  then keeps sentencepiece's dummy prefix on text that starts with a space.
  split_special_tokens: "<s>" in a text is three characters, as pn-jax encodes it (the bos
  pn-jax's prompts start with is added by the post-processor, add_bos_token).
  """
  if tok.kind == tok_lib.BYTE:
    names, spec = {"pad": "<pad>", "bos": "<s>", "eos": "</s>"}, byte_tokenizer_json(tok)
  else:
    proto = sentencepiece_proto(tok.path)
    names = {k: proto.pieces[getattr(tok, f"{k}_id")].piece for k in ("pad", "bos", "eos")}
    names["unk"] = proto.pieces[proto.trainer_spec.unk_id].piece
    spec = unigram_tokenizer_json(proto, tok.bos_id)
  special = {f"{k}_token": v for k, v in names.items()}
  config = {"tokenizer_class": "PreTrainedTokenizerFast", **special, "add_bos_token": True,
            "add_eos_token": False, "legacy": True, "clean_up_tokenization_spaces": False,
            "split_special_tokens": True,
            "model_max_length": max_len}
  files = {TOKENIZER_CONFIG: config, SPECIAL_TOKENS: special}
  if spec is not None:
    files[TOKENIZER_JSON] = spec
  return files


def sentencepiece_proto(path: str):
  from sentencepiece import sentencepiece_model_pb2
  proto = sentencepiece_model_pb2.ModelProto()
  with open(path, "rb") as f:
    proto.ParseFromString(f.read())
  return proto


def _replace(pattern: str, content: str, regex: bool = False) -> dict:
  return {"type": "Replace", "pattern": {"Regex" if regex else "String": pattern},
          "content": content}


def _bos_template(bos: str, bos_id: int) -> dict:
  """The post-processor that puts bos before a sequence (pn-jax's prompts start with bos)."""
  token = lambda t, i: {"SpecialToken": {"id": t, "type_id": i}}
  seq = lambda s, i: {"Sequence": {"id": s, "type_id": i}}
  return {"type": "TemplateProcessing", "single": [token(bos, 0), seq("A", 0)],
          "pair": [token(bos, 0), seq("A", 0), token(bos, 1), seq("B", 1)],
          "special_tokens": {bos: {"id": bos, "ids": [bos_id], "tokens": [bos]}}}


def _added(pieces: list[tuple[int, str]]) -> list[dict]:
  return [{"id": i, "content": p, "single_word": False, "lstrip": False, "rstrip": False,
           "normalized": False, "special": True} for i, p in pieces]


def unigram_tokenizer_json(proto, bos_id: int) -> dict | None:
  """A unigram sentencepiece model as a `tokenizers` Tokenizer (None for other model types).

  Encodes as SentencePieceProcessor.encode does: the normalizer spec replayed (charsmap, extra
  whitespace, "▁" for spaces, the dummy prefix added even before a leading space), user-defined
  pieces (pn-jax's "\\n", "\\t") isolated and never merged, bytes for unknown characters.
  sentencepiece never matches byte, control or unknown pieces in text ("<0x41>", "<s>" stay
  characters): here they score far below any path of ordinary pieces (UNMATCHED), so the Viterbi
  search never picks them either (byte fallback maps to them by name). Control and unknown
  pieces are also special added tokens (decode's skip_special_tokens drops them).
  """
  if proto.trainer_spec.model_type != 1:  # UNIGRAM
    return None
  spec, pieces = proto.normalizer_spec, proto.pieces
  vocab = [[p.piece, p.score if p.type in (1, 4) else UNMATCHED] for p in pieces]
  norm = []
  if spec.precompiled_charsmap:
    import base64
    norm.append({"type": "Precompiled",
                 "precompiled_charsmap": base64.b64encode(spec.precompiled_charsmap).decode()})
  if spec.remove_extra_whitespaces:
    norm += [_replace(r"\A +| +\z", "", regex=True), _replace(" {2,}", " ", regex=True)]
  if spec.escape_whitespaces:
    norm.append(_replace(" ", SPACE))
  pre = []
  if spec.add_dummy_prefix:
    norm.append(_replace(rf"\A{SPACE}", SPACE * 2, regex=True))  # Metaspace skips it otherwise
    pre.append({"type": "Metaspace", "replacement": SPACE, "prepend_scheme": "always",
                "split": False})
  user = sorted((p.piece for p in pieces if p.type == 4), key=len, reverse=True)  # USER_DEFINED
  if user:
    pre.append({"type": "Split", "pattern": {"Regex": "|".join(re.escape(u) for u in user)},
                "behavior": "Isolated", "invert": False})
  byte_fallback = bool(proto.trainer_spec.byte_fallback)
  decoders = [_replace(SPACE, " ")] + [{"type": "ByteFallback"}] * byte_fallback
  decoders += [{"type": "Fuse"}]
  if spec.add_dummy_prefix:
    decoders.append({"type": "Strip", "content": " ", "start": 1, "stop": 0})
  return {"version": "1.0", "truncation": None, "padding": None,
          "added_tokens": _added([(i, p.piece) for i, p in enumerate(pieces) if p.type in (2, 3)]),
          "normalizer": {"type": "Sequence", "normalizers": norm} if norm else None,
          "pre_tokenizer": {"type": "Sequence", "pretokenizers": pre} if pre else None,
          "post_processor": _bos_template(pieces[bos_id].piece, bos_id),
          "decoder": {"type": "Sequence", "decoders": decoders},
          "model": {"type": "Unigram", "unk_id": proto.trainer_spec.unk_id, "vocab": vocab,
                    "byte_fallback": byte_fallback}}


def byte_tokenizer_json(tok: tok_lib.Tokenizer) -> dict:
  """pn-jax's byte tokenizer (byte b -> id b + 3; pad 0, bos 1, eos 2): a BPE with no merges
  whose vocabulary is the 256 byte pieces, so every character goes through byte fallback."""
  specials = [(tok.pad_id, "<pad>"), (tok.bos_id, "<s>"), (tok.eos_id, "</s>")]
  vocab = {p: i for i, p in specials} | {f"<0x{b:02X}>": b + 3 for b in range(256)}
  return {"version": "1.0", "truncation": None, "padding": None, "added_tokens": _added(specials),
          "normalizer": None, "pre_tokenizer": None,
          "post_processor": _bos_template("<s>", tok.bos_id),
          "decoder": {"type": "Sequence", "decoders": [{"type": "ByteFallback"},
                                                       {"type": "Fuse"}]},
          "model": {"type": "BPE", "dropout": None, "unk_token": None,
                    "continuing_subword_prefix": None, "end_of_word_suffix": None,
                    "fuse_unk": False, "byte_fallback": True, "ignore_merges": False,
                    "vocab": vocab, "merges": []}}
