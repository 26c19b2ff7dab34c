"""pn-jax's tokenizer as Hugging Face `tokenizers` / transformers files (the hf export's).

tokenizer.json is built from the sentencepiece model's proto, so transformers loads pn-jax's
tokenizer as it is, with no conversion and no sentencepiece at load time, and
`AutoTokenizer(text).input_ids` is [bos] + pn-jax's encode(text) (tests/test_hf_export.py).
transformers' own conversion of tokenizer.model builds a BPE tokenizer, which disagrees with
pn-jax's unigram models on most texts.
"""

from __future__ import annotations

import re

from pn_jax.data import tokenizer as tok_lib

TOKENIZER_JSON, TOKENIZER_CONFIG, SPECIAL_TOKENS = ("tokenizer.json", "tokenizer_config.json",
                                                    "special_tokens_map.json")
FILES = (TOKENIZER_JSON, TOKENIZER_CONFIG, SPECIAL_TOKENS)
SPACE = "\u2581"  # sentencepiece's whitespace symbol
# The unigram score of pieces sentencepiece never matches in text: far below any path of ordinary
# pieces (scores > -100 each), yet small enough that float64 sums over long texts stay exact
# to well under the score gaps the search compares.
UNMATCHED = -1e4


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
