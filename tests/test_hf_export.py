"""Export format hf: transformers loads the directory offline, with pn-jax's logits and ids."""

import json
import os
import shutil

os.environ["HF_HUB_OFFLINE"] = "1"  # before huggingface_hub is imported: no network, ever

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from conftest import copy_workdir, load_config, quiet, snapshot  # noqa: E402
from pn_jax import hf_export, modes, safetensors_io  # noqa: E402
from pn_jax.config import ConfigError  # noqa: E402
from pn_jax.data import hf_tokenizer, tokenizer as tok_lib  # noqa: E402
from pn_jax.generate import generate  # noqa: E402
from pn_jax.model import build_model  # noqa: E402
from pn_jax.model.model_config import ModelConfig  # noqa: E402
from pn_jax.model.transformer import init_params  # noqa: E402
from pn_jax.modes.pretrain import pretrain  # noqa: E402
from pn_jax.parallel import mesh as mesh_lib  # noqa: E402
from pn_jax.specialize.project import project  # noqa: E402
from pn_jax.train.checkpoint import Checkpointer  # noqa: E402
from pn_jax.train.optimizer import make_optimizer  # noqa: E402
from pn_jax.train.state import create_state  # noqa: E402

transformers = pytest.importorskip("transformers")  # a guard: CI installs pn-jax[hf]
torch = pytest.importorskip("torch")

TEXTS = ["The court held that the contract was void.", " leading space", "  two spaces",
         "tabs\tand\nnew lines\n\n end ", "naïve café, 日本語 and 😀", "<s> is text, not bos",
         "x", ""]


def hf_model(path):
  return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                           local_files_only=True).eval()


def hf_logits(model, tokens_BT) -> np.ndarray:
  with torch.no_grad():
    return model(torch.from_numpy(np.asarray(tokens_BT, np.int64))).logits.numpy()


def pn_logits(model, params, tokens_BT) -> np.ndarray:
  return np.asarray(jax.jit(model.apply)({"params": params}, np.asarray(tokens_BT, np.int32)))


def assert_close_logits(got, want):
  """float32 agreement: max |diff| within 1e-4 of the logits' scale."""
  scale = float(np.abs(want).max())
  assert np.abs(got - want).max() <= 1e-4 * max(scale, 1.0), (np.abs(got - want).max(), scale)


@pytest.fixture(scope="module")
def exported(prepared, tmp_path_factory):
  """A tiny llama-arch PN pretrained 2 steps, specialized 2 steps on legal, exported as hf and
  as pn (the pn export reloads into pn-jax with the checkpoint's exact logits: test_export.py)."""
  root = tmp_path_factory.mktemp("hf")
  pn_dir = copy_workdir(prepared, root, "pn")
  pretrain(quiet(load_config("pn", "tiny,arch=llama"), steps=2, checkpoint_every=2,
                 eval_every=100), pn_dir)
  legal = str(root / "legal")
  config = quiet(load_config("finetune", "tiny"), steps=2, eval_every=2, checkpoint_every=2)
  config.init_from, config.data.domain, config.data.eval_batches = pn_dir, "legal", 1
  modes.MODES["specialize"](config, legal)
  config.export.format = "hf"
  result = modes.MODES["export"](config, legal)
  config.export.format = "pn"
  pn_model, pn_params, _ = safetensors_io.load(modes.MODES["export"](config, legal)["export_dir"])
  return result, pn_model, pn_params


def test_hf_export_loads_in_transformers_with_pn_jax_logits(exported):
  result, pn_model, pn_params = exported
  out = result["export_dir"]
  assert out.endswith("export_hf") and result["format"] == "hf"
  assert sorted(os.listdir(out)) == sorted(hf_export.FILES)
  with open(os.path.join(out, "config.json")) as f:
    info = json.load(f)
  assert info["pn_jax"]["domain"] == "legal" and info["pn_jax"]["model"]["arch"] == "llama"
  assert info["dtype"] == "float32"
  model = hf_model(out)
  assert type(model).__name__ == "LlamaForCausalLM" and model.config.tie_word_embeddings
  tokens = np.random.default_rng(0).integers(0, pn_model.cfg.vocab_size, (2, 24))
  assert_close_logits(hf_logits(model, tokens), pn_logits(pn_model, pn_params, tokens))


def test_greedy_generation_is_the_same_sequence(exported):
  result, pn_model, pn_params = exported
  out = result["export_dir"]
  tok = transformers.AutoTokenizer.from_pretrained(out, local_files_only=True)
  prompt = tok("The court held", return_tensors="pt")
  with torch.no_grad():
    hf_ids = hf_model(out).generate(**prompt, do_sample=False, max_new_tokens=12)[0].tolist()
  pn_ids = np.asarray(generate(pn_model, pn_params, prompt.input_ids[0].numpy(), new_tokens=12,
                               temperature=0.0))[0].tolist()
  # transformers stops after eos (the generation config's), pn-jax's sampler runs on
  assert len(hf_ids) > prompt.input_ids.shape[1]
  assert hf_ids == pn_ids[:len(hf_ids)], (hf_ids, pn_ids)


def test_tokenizer_gives_pn_jax_ids(exported):
  out = exported[0]["export_dir"]
  hf_tok = transformers.AutoTokenizer.from_pretrained(out, local_files_only=True)
  pn_tok = tok_lib.load_tokenizer(os.path.join(out, "tokenizer.model"))
  assert (hf_tok.pad_token_id, hf_tok.bos_token_id, hf_tok.eos_token_id) == (0, 2, 3)
  for text in TEXTS:
    ids = pn_tok.encode(text)
    assert hf_tok(text).input_ids == [pn_tok.bos_id] + ids, text  # bos, as pn-jax's prompts
    assert hf_tok(text, add_special_tokens=False).input_ids == ids, text
    assert hf_tok.decode([pn_tok.bos_id] + ids, skip_special_tokens=True) == text, text


def test_byte_tokenizer_gives_pn_jax_ids(tmp_path):
  pn_tok = tok_lib.byte_tokenizer()
  with open(tmp_path / "config.json", "w") as f:
    json.dump({"model_type": "llama"}, f)
  for name, content in hf_tokenizer.tokenizer_files(pn_tok, max_len=128).items():
    with open(tmp_path / name, "w") as f:
      json.dump(content, f)
  hf_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path), local_files_only=True)
  for text in TEXTS:
    assert hf_tok(text).input_ids == [pn_tok.bos_id] + pn_tok.encode(text), text
    assert hf_tok.decode(hf_tok(text).input_ids, skip_special_tokens=True) == text


def test_untied_gelu_model_gives_pn_jax_logits(tmp_path, prepared):
  """Untied unembedding (lm_head), the tanh GELU, another RoPE base and eps: random weights."""
  config = load_config("slm", "tiny,arch=llama").model
  config.update(tie_embeddings=False, activation="gelu", rope_theta=500_000.0, norm_eps=1e-5)
  cfg = ModelConfig.from_config(config)
  model = build_model(cfg)
  params = jax.device_get(nn.unbox(init_params(model, jax.random.key(1))))
  out = hf_export.save(str(tmp_path / "hf"), params, cfg,
                       tokenizer=str(prepared / "tokenizer.model"))
  hf = hf_model(out)
  assert not hf.config.tie_word_embeddings and hf.config.hidden_act == "gelu_pytorch_tanh"
  tokens = np.random.default_rng(1).integers(0, cfg.vocab_size, (2, 32))
  assert_close_logits(hf_logits(hf, tokens), pn_logits(model, params, tokens))
  # an hf export replaces an earlier one; the other format's directory is never replaced
  hf_export.save(out, params, cfg, tokenizer=tok_lib.BYTE, metadata={"step": 2})
  assert "tokenizer.model" not in os.listdir(out)
  with pytest.raises(safetensors_io.ExportError, match="config.json of format 'pn-jax-hf-llama/1'"):
    safetensors_io.save(out, params, config)
  pn_out = safetensors_io.save(str(tmp_path / "pn"), params, config)
  with pytest.raises(safetensors_io.ExportError, match="config.json of format 'pn-jax-dense-lm/1'"):
    hf_export.save(pn_out, params, cfg, tokenizer=tok_lib.BYTE)


def write_checkpoint(config, workdir: str, step: int = 1):
  """A checkpoint of `config`'s freshly initialized model, as the training code writes it (no
  training, no data) -> its params."""
  config = config.copy_and_resolve_references()
  config.mesh.update(data=1, fsdp=1, tensor=1)
  mesh, rules = mesh_lib.make_mesh(config, jax.devices()[:1]), mesh_lib.logical_rules(config)
  with mesh_lib.activate(mesh, rules):
    state, _ = create_state(build_model(config.model), make_optimizer(config)[0], mesh, rules,
                            jax.random.key(0))
    ckpt = Checkpointer(workdir, async_save=False)
    ckpt.save(step, state, config, force=True)
    ckpt.close()
  return jax.device_get(state.params)


@pytest.mark.parametrize("name, arch", [("pn", "gpt"), ("pn", "llama"), ("mix_shared", "llama"),
                                        ("mix", "gpt")])  # PN, hard mixture, SLM-mix
def test_routed_run_exports_its_cluster_projection(name, arch, prepared, tmp_path):
  """A routed pretraining run exports the dense model of config.sample.cluster: transformers'
  logits are those of pn-jax's projection onto that cluster (gpt, the default arch, as Arcee)."""
  workdir = tmp_path / name
  workdir.mkdir()
  shutil.copyfile(prepared / "tokenizer.model", workdir / "tokenizer.model")
  config = load_config(name, f"tiny,arch={arch}" if arch == "llama" else "tiny")
  assert config.model.arch == arch
  params = write_checkpoint(config, str(workdir), step=3)
  config.export.format = "hf"
  with pytest.raises(ConfigError, match="config.sample.cluster: .* one expert per cluster"):
    modes.MODES["export"](config, str(workdir))  # which expert: the user's choice, not ours
  config.sample.cluster = 1
  result = modes.MODES["export"](config, str(workdir))
  assert result["format"] == "hf" and result["cluster"] == 1 and result["step"] == 3
  with open(os.path.join(result["export_dir"], "config.json")) as f:
    info = json.load(f)["pn_jax"]
  assert info["cluster"] == 1 and info["model"]["mlp_kind"] == "dense"
  dense_params, dense_cfg = project(params, config.model, 1)
  hf = hf_model(result["export_dir"])
  assert type(hf).__name__ == hf_export.ARCHITECTURES[arch][0]
  tokens = np.random.default_rng(2).integers(0, config.model.vocab_size, (2, 24))
  assert_close_logits(hf_logits(hf, tokens), pn_logits(build_model(dense_cfg), dense_params, tokens))


def test_default_slm_exports_in_bfloat16_for_serving(prepared, tmp_path):
  """The default config (arch gpt) with --config.export.dtype=bfloat16: bfloat16 weights that
  transformers loads as an Arcee model in bfloat16, logits within bfloat16's rounding."""
  workdir = tmp_path / "slm"
  workdir.mkdir()
  shutil.copyfile(prepared / "tokenizer.model", workdir / "tokenizer.model")
  config = load_config("slm", "tiny")
  params = write_checkpoint(config, str(workdir))
  config.export.update(format="hf", dtype="bfloat16")
  out = modes.MODES["export"](config, str(workdir))["export_dir"]
  from safetensors.numpy import load_file
  assert {str(t.dtype) for t in load_file(os.path.join(out, "model.safetensors")).values()} == {
      "bfloat16"}
  hf = transformers.AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
  assert hf.dtype == torch.bfloat16 and type(hf).__name__ == "ArceeForCausalLM"
  tokens = np.random.default_rng(3).integers(0, config.model.vocab_size, (2, 16))
  want = pn_logits(build_model(config.model), params, tokens)
  with torch.no_grad():
    got = hf(torch.from_numpy(tokens)).logits.float().numpy()
  assert np.abs(got - want).max() <= 0.05 * max(float(np.abs(want).max()), 1.0)
  assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.9


def test_bad_dtype_or_format_is_refused_and_nothing_is_written(tmp_path):
  workdir = str(tmp_path / "slm")
  write_checkpoint(load_config("slm"), workdir)
  config = load_config("finetune", "tiny")
  config.export.update(format="hf", dtype="float16")
  before = snapshot(workdir, ignore=("LOCK",))
  with pytest.raises(ConfigError, match=r"config.export.dtype='float16': one of \['bfloat16', "
                                        r"'float32'\]"):
    modes.MODES["export"](config, workdir)
  assert snapshot(workdir, ignore=("LOCK",)) == before
  config.export.update(format="onnx", dtype="float32")
  with pytest.raises(ConfigError, match="config.export.format: unknown format 'onnx'"):
    modes.MODES["export"](config, workdir)
