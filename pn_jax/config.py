"""The run config: one ml_collections tree shared by every mode, plus its validation.

Files under `configs/` start from `base_config()` and override what their run kind needs;
`validate(config)` turns every inconsistency we can detect before touching a device into a
`ConfigError` that names the offending key.
"""

from __future__ import annotations

import math

import ml_collections

MLP_KINDS = ("dense", "mixture", "projected")
# model.arch -> the MLP form: gpt act(x@w_in)@w_out | llama (act(x@w_gate) * (x@w_in)) @ w_out
ARCHS = ("gpt", "llama")
CLUSTER_BATCHING = ("mixed", "homogeneous", "stratified")
# model.mixed_mlp -> how a mixture/projected MLP applies a mixed-cluster batch's experts
# (pn_jax/model/transformer.py::LM): one weight per sequence, or sorted by cluster + ragged_dot
MIXED_MLPS = ("per_sequence", "grouped")
# model.remat -> what nn.remat keeps for the backward pass: (a jax.checkpoint_policies name, and
# the arguments to call it with or None if it is the policy itself); "none": no remat, "full":
# nn.remat's default (keeps nothing). Names, not functions: this module imports no jax
# (pn_jax/model/transformer.py::remat_policy resolves them).
REMAT_POLICIES = {
    "none": None,
    "full": (None, None),
    "dots": ("checkpoint_dots", None),
    "dots_no_batch": ("dots_with_no_batch_dims_saveable", None),
    "save_out": ("save_only_these_names", ("attn_out", "mlp_out")),  # Block's checkpoint_names
}
CODE_INITS = ("random", "shared")  # pn_jax/model/transformer.py::CODE_INITS
NAN_POLICIES = ("stop", "skip")
BASIS_MOMENTS = ("float32", "bfloat16", "factored")  # pn_jax/train/basis_moments.py
BASIS_DTYPES = ("float32", "bfloat16")  # model.basis_dtype: how T is stored
MESH_AXES = ("data", "fsdp", "tensor")


class ConfigError(ValueError):
  """A config that cannot describe a valid run; the message names the key and the fix."""


def base_config() -> ml_collections.ConfigDict:
  """Defaults for every run kind; `configs/*.py` override a few keys each."""
  c = ml_collections.ConfigDict()
  c.name = "run"
  c.seed = 0
  c.model = _model_defaults()
  c.data = _data_defaults()
  c.optim = _optim_defaults()
  c.train = _train_defaults()
  # --- specialization (modes specialize / distill / importance / sample / export) -----------
  c.init_from = ""  # workdir of the pretraining (or, for distill, the student's) run
  c.init_step = 0  # init_from's checkpoint to start from: 0 = its latest, >0 = that step
  c.specialize = _specialize_defaults()
  c.distill = _distill_defaults()
  c.prune = _prune_defaults()
  c.sample = _sample_defaults()
  c.mesh = _mesh_defaults()
  c.export = _export_defaults()
  return c


# --- model ---------------------------------------------------------------------------------
def _model_defaults() -> ml_collections.ConfigDict:
  m = ml_collections.ConfigDict()
  m.vocab_size = 32_000
  m.d_model = 1024
  m.n_layers = 7
  m.n_heads = 8
  m.mlp_dim = 4096  # the *small* model's MLP width (the SLM's), for every kind
  m.mlp_kind = "dense"  # dense | mixture | projected
  m.arch = "gpt"  # gpt: act(x@w_in)@w_out | llama: gated MLP with w_gate (pn_jax/model/mlp.py)
  m.k = 1  # experts = clusters (mixture, projected)
  m.h = 1  # basis slices of the shared tensor T (projected)
  m.m = 1  # code length per expert: E is [k, m] (projected)
  # Expert codes' init (projected): shared (unit rows near one shared direction: the experts
  # start alike; pn_jax/model/transformer.py::shared_rows_init) | random (independent unit
  # rows, the default before the GPU comparison of docs/results.md: generic ppl 22.7 vs 18.3).
  m.code_init = "shared"
  # code_init=shared: norm of each code's own random part next to the shared unit direction
  # (0.25: cosine ~0.94 between experts at init; larger starts the experts further apart).
  m.code_spread = 0.25
  # True: the paper's SLM-mix, k independent copies of the dense model above (no shared
  # parameter), trained batched over a leading expert axis on stratified batches
  # (pn_jax/model/independent_experts.py). Needs mlp_kind=dense and data.cluster_batching=stratified.
  m.independent_experts = False
  m.activation = "gelu"  # gelu | relu | silu
  m.tie_embeddings = True
  m.max_len = 1024  # RoPE table length; >= data.seq_len
  m.rope_theta = 10_000.0
  m.norm_eps = 1e-6
  m.dtype = "bfloat16"  # compute dtype
  m.param_dtype = "float32"
  # PN (and mixture) only: the dtype the basis tensors T are stored in. "bfloat16" halves the
  # bytes every step reads and writes for T (forming, its gradient, the optimizer); its updates
  # are stochastically rounded (pn_jax/train/basis_moments.py::apply_updates).
  m.basis_dtype = "float32"
  # False unrolls the layer scan (same stacked params): ~30% faster steps on an H100 for 12
  # layers (docs/benchmarks.md) at a longer compile; True keeps one compiled block (deep models).
  m.scan_layers = False
  m.remat = "none"  # none | full | dots | dots_no_batch | save_out
  m.attention = "auto"  # auto (cudnn on GPU) | xla | cudnn
  m.logits_chunk = 0  # >0: chunked cross-entropy over the sequence (avoids [B,T,V] fp32 logits)
  # Mixed-cluster batches (mixture, projected): per_sequence (a [B, D, F] weight per sequence,
  # batched einsums) | grouped (sequences sorted by cluster, one weight per distinct cluster,
  # jax.lax.ragged_dot: for a backend whose grouped matmul covers the weight gradient; on GPU with
  # jax 0.11 it is a dense masked product, ~23x slower for one MLP matrix on an H200, and on TPU
  # its weight gradient is: docs/benchmarks.md).
  m.mixed_mlp = "per_sequence"
  return m


# --- data ----------------------------------------------------------------------------------
def _data_defaults() -> ml_collections.ConfigDict:
  d = ml_collections.ConfigDict()
  d.corpus = "tiny"  # tiny (bundled) | generic | a path to a prepared corpus dir
  d.data_dir = "data_cache"  # where `python -m pn_jax.data prepare` writes corpora
  d.tokenizer = "sentencepiece"  # sentencepiece | byte
  d.tokenizer_path = ""  # empty: trained on the corpus and saved in the workdir
  d.seq_len = 128
  d.batch_size = 8  # global, in sequences
  d.eval_batches = 4
  d.cluster_embedding = "tfidf"  # tfidf | minilm (sentence-BERT all-MiniLM-L6-v2, optional deps)
  d.cluster_window = 0  # tokens per clustered window; 0: seq_len (the paper: 1,024)
  d.cluster_dim = 64  # TF-IDF -> SVD dimensions
  # True: balanced k-means (c-BTM): every cluster gets as many training windows as another (within
  # one); text routed later (validation, a domain) still goes to its nearest centroid.
  d.cluster_balance = False
  d.tokenizer_sample_chars = 20_000_000  # generic text the sentencepiece model trains on
  # Content-addressed data-preparation artefacts (tokens, embeddings, clusters, packed set) shared
  # by the runs that point here ("": only this run's packed set, under <workdir>/data).
  d.cache_dir = ""
  d.prep_workers = 0  # processes embedding the clustering windows; 0: os.cpu_count()
  # mixed: batches drawn from the whole generic set, the paper's objective (expected loss over
  # generic data); homogeneous: one cluster per step, cheaper for PN (one weight per step) but
  # measurably worse (docs/data.md): an option for speed studies; stratified: batch_size/k rows
  # of each cluster per step, in cluster order (the independent experts' batches).
  d.cluster_batching = "mixed"
  d.num_workers = 0
  d.domain = ""  # specialization domain name (finetune / eval); eval: "all" = every domain
  d.domain_tokens = 0  # specialize: >0 keeps a fixed prefix of this many domain training tokens
  return d


# --- optimiser -----------------------------------------------------------------------------
def _optim_defaults() -> ml_collections.ConfigDict:
  o = ml_collections.ConfigDict()
  o.lr = 1e-4
  o.min_lr_ratio = 0.1
  o.warmup_steps = 1000
  o.decay_steps = 0  # 0: decay over train.steps
  o.b1 = 0.9
  o.b2 = 0.95
  o.eps = 1e-8
  o.weight_decay = 0.1
  o.clip_norm = 5.0
  # PN only: multiplies the learning rate of the shared basis tensors T (see
  # pn_jax/train/optimizer.py::scale_basis_updates; 1/sqrt(h) gives projected weights the dense
  # model's Adam step size, which trained worse at the scale of docs/results.md).
  o.basis_lr_scale = 1.0
  # PN only: False exempts the expert codes E and the per-layer maps M from weight decay (a
  # product E M T is scaled by every factor's decay; T alone is the matrix a dense model decays).
  o.decay_codes = True
  # PN (and mixture) only: how the Adam moments of the basis tensors T are stored: "float32",
  # "bfloat16" (stochastically rounded) or "factored" (Adafactor-style second moment, bfloat16
  # first moment); fewer optimizer bytes per step (pn_jax/train/basis_moments.py).
  o.basis_moments = "float32"
  return o


# --- training loop -------------------------------------------------------------------------
def _train_defaults() -> ml_collections.ConfigDict:
  t = ml_collections.ConfigDict()
  t.steps = 10_000  # length of the run (and of the LR schedule)
  t.stop_at_step = 0  # >0: checkpoint and exit at this step (time-boxed jobs); resume later
  t.log_every = 10
  t.eval_every = 500
  t.checkpoint_every = 500
  t.checkpoint_every_minutes = 0.0  # >0: also checkpoint when this much wall clock has passed
  t.keep_checkpoints = 3
  t.async_checkpoint = True
  t.nan_policy = "stop"  # stop | skip
  t.early_stop_patience = 0  # >0: stop after this many evals without a better eval loss; 0: never
  t.progress_bar = True
  t.peak_tflops = 0.0  # 0: look the device up in pn_jax.train.flops
  return t


# --- specialization ------------------------------------------------------------------------
def _specialize_defaults() -> ml_collections.ConfigDict:
  sp = ml_collections.ConfigDict()
  # frequent: the domain's most frequent cluster | lowest_loss: the expert with the lowest loss |
  # shares: every expert, its weights averaged by the domain's cluster shares (PN, mixture)
  sp.select = "frequent"
  sp.select_batches = 4  # lowest_loss: domain training batches scored per expert
  sp.expect_kind = ""  # "" any; else refuse an init_from of another kind (an mlp_kind or
  # "independent": SLM-mix's independent experts)
  return sp


def _distill_defaults() -> ml_collections.ConfigDict:
  ds = ml_collections.ConfigDict()
  ds.teacher = ""  # workdir of the (fine-tuned) teacher; set => distillation loss
  ds.temperature = 2.0  # soft-target temperature
  ds.weight = 0.5  # loss = (1 - weight) * LM loss + weight * temperature^2 * KL(teacher || student)
  return ds


def _prune_defaults() -> ml_collections.ConfigDict:
  # mode prune (SLM-prune, pn_jax/specialize/structured_pruning.py): init_from's dense model
  # cut to these widths; whole heads are kept at init_from's head_dim, so d_model is a
  # multiple of it
  pr = ml_collections.ConfigDict()
  pr.d_model = 0  # residual channels kept (0: init_from's d_model)
  pr.mlp_dim = 0  # MLP neurons kept per layer (0: init_from's MLP width)
  pr.calibration_batches = 8  # generic training batches (data.batch_size each) scored and fit on
  pr.ridge = 1e-3  # the least-squares repair's ridge, relative to the mean of the Gram diagonal
  pr.repair = True  # False: keep the sliced output weights (only the norms are matched)
  return pr


def _sample_defaults() -> ml_collections.ConfigDict:
  sa = ml_collections.ConfigDict()
  sa.prompt = ""
  sa.max_new_tokens = 64
  sa.temperature = 1.0  # 0: greedy
  sa.top_k = 0  # 0: off
  sa.top_p = 1.0  # 1: off
  sa.num_samples = 1
  sa.cluster = -1  # routed checkpoints (PN, mixture, SLM-mix): the expert (-1: cluster 0)
  return sa


def _export_defaults() -> ml_collections.ConfigDict:
  ex = ml_collections.ConfigDict()
  # pn: <workdir>/export, pn-jax's safetensors layout (pn_jax/safetensors_io.py, reloads into
  # pn_jax.model); hf: <workdir>/export_hf, a transformers directory (Arcee/Llama) with its
  # tokenizer (pn_jax/hf_export.py: gpt -> ArceeForCausalLM, llama -> LlamaForCausalLM).
  ex.format = "pn"
  ex.dtype = "float32"  # hf: the weights' dtype, float32 or bfloat16 (what serving loads)
  return ex


# --- parallelism ---------------------------------------------------------------------------
def _mesh_defaults() -> ml_collections.ConfigDict:
  ml = ml_collections.ConfigDict()
  ml.data = -1  # -1: whatever the device count leaves
  ml.fsdp = 1
  ml.tensor = 1
  # Logical axis -> mesh axes (MaxText style). Keys are the logical names the model uses.
  ml.rules = ml_collections.ConfigDict(
      dict(
          batch=("data", "fsdp"),
          seq=None,
          embed=("fsdp",),
          vocab=("tensor",),
          heads=("tensor",),
          head_dim=None,
          mlp=("tensor",),
          expert=None,
          basis=None,  # the PN basis axis h stays whole: projection needs no communication
          code=None,
          layers=None,
      )
  )
  return ml


def _fail(key: str, msg: str):
  raise ConfigError(f"config.{key}: {msg}")


def validate(config: ml_collections.ConfigDict, *, device_count: int | None = None) -> None:
  """Raises ConfigError for any inconsistency; `device_count` also checks the mesh."""
  _validate_finite(config)
  _validate_sizes(config)
  _validate_model(config)
  _validate_training(config)
  _validate_specialize(config)
  _validate_mesh(config, device_count)


def _validate_finite(config: ml_collections.ConfigDict, prefix: str = "") -> None:
  """No key takes nan or inf (optim.lr, warmup, clipping, weight decay, temperatures, ...): the
  range checks below compare with `<`, which nan passes, and a nan learning rate used to fail
  only at step 2 as a diverged loss."""
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      _validate_finite(value, f"{prefix}{key}.")
    elif isinstance(value, float) and not math.isfinite(value):
      _fail(f"{prefix}{key}", f"must be a finite number, got {value}")


def _validate_sizes(config: ml_collections.ConfigDict) -> None:
  m, d, t = config.model, config.data, config.train
  for key, value in [("model.vocab_size", m.vocab_size), ("model.d_model", m.d_model),
                     ("model.n_layers", m.n_layers), ("model.n_heads", m.n_heads),
                     ("model.mlp_dim", m.mlp_dim), ("data.seq_len", d.seq_len),
                     ("data.batch_size", d.batch_size), ("train.steps", t.steps)]:
    if not isinstance(value, int) or value < 1:
      _fail(key, f"must be a positive integer, got {value!r}")


def _validate_model(config: ml_collections.ConfigDict) -> None:
  m, d = config.model, config.data
  if m.d_model % m.n_heads:
    _fail("model.n_heads", f"{m.n_heads} heads do not divide d_model={m.d_model}")
  if (m.d_model // m.n_heads) % 2:
    _fail("model.n_heads", f"head_dim={m.d_model // m.n_heads} must be even for RoPE")
  if m.mlp_kind not in MLP_KINDS:
    _fail("model.mlp_kind", f"unknown kind {m.mlp_kind!r}; choose one of {MLP_KINDS}")
  if m.get("arch", "gpt") not in ARCHS:  # .get: configs saved before the key are gpt
    _fail("model.arch", f"unknown architecture {m.arch!r}; choose one of {ARCHS}")
  if m.k < 1:
    _fail("model.k", f"number of experts/clusters must be >= 1, got {m.k}")
  if m.mlp_kind == "projected":
    if m.h < 1 or m.m < 1:
      _fail("model.h", f"projected MLP needs h >= 1 and m >= 1, got h={m.h}, m={m.m}")
    if m.code_init not in CODE_INITS:
      _fail("model.code_init", f"unknown code init {m.code_init!r}; choose one of {CODE_INITS}")
    if not m.get("code_spread", 0.25) >= 0:  # .get: configs saved before the key
      _fail("model.code_spread", f"must be >= 0, got {m.code_spread}")
    if m.m > m.h:
      _fail("model.m", f"code length m={m.m} exceeds basis size h={m.h}: M [m, h] would be "
            "rank-deficient by construction; use m <= h")
  _validate_experts(config)
  if m.remat not in REMAT_POLICIES:
    _fail("model.remat", f"unknown policy {m.remat!r}; choose one of {tuple(REMAT_POLICIES)}")
  if m.get("mixed_mlp", "per_sequence") not in MIXED_MLPS:  # .get: saved before the key
    _fail("model.mixed_mlp", f"unknown mixed-batch MLP {m.mixed_mlp!r}; choose one of "
          f"{MIXED_MLPS}")
  if m.attention not in ("auto", "xla", "cudnn"):
    _fail("model.attention", f"unknown implementation {m.attention!r}")
  if m.dtype not in ("bfloat16", "float32", "float16") or m.param_dtype not in (
      "bfloat16", "float32"):
    _fail("model.dtype", f"unsupported dtypes dtype={m.dtype!r} param_dtype={m.param_dtype!r}")
  basis_dtype = m.get("basis_dtype", "float32")  # .get: saved before the key
  if basis_dtype not in BASIS_DTYPES:
    _fail("model.basis_dtype", f"unknown {basis_dtype!r}; choose one of {BASIS_DTYPES}")
  if basis_dtype != "float32" and m.mlp_kind == "dense":
    _fail("model.basis_dtype", f"stores a PN's (or mixture's) basis tensors T; this model is "
          f"mlp_kind='dense' and has none (leave it at 'float32')")
  if d.seq_len > m.max_len:
    _fail("data.seq_len", f"{d.seq_len} exceeds model.max_len={m.max_len}")
  if m.logits_chunk < 0 or (m.logits_chunk and d.seq_len % m.logits_chunk):
    _fail("model.logits_chunk", f"{m.logits_chunk} must be 0 or divide seq_len={d.seq_len}")


def _validate_training(config: ml_collections.ConfigDict) -> None:
  """The train and optim sections (and init_step)."""
  m, o, t = config.model, config.optim, config.train
  if t.early_stop_patience < 0:
    _fail("train.early_stop_patience", f"must be >= 0 (0: never stop early; a specialization "
          f"still reports its best eval step), got {t.early_stop_patience}")
  if t.stop_at_step < 0:
    _fail("train.stop_at_step", f"must be >= 0 (0: off), got {t.stop_at_step}")
  if config.get("init_step", 0) < 0:
    _fail("init_step", f"must be 0 (the latest checkpoint of init_from) or a saved step, got "
          f"{config.init_step}")
  if t.nan_policy not in NAN_POLICIES:
    _fail("train.nan_policy", f"unknown policy {t.nan_policy!r}; choose one of {NAN_POLICIES}")
  if o.lr <= 0:
    _fail("optim.lr", f"must be > 0, got {o.lr}")
  if o.warmup_steps < 0 or o.decay_steps < 0:
    _fail("optim.warmup_steps", "warmup_steps and decay_steps must be >= 0")
  if not 0.0 <= o.min_lr_ratio <= 1.0:
    _fail("optim.min_lr_ratio", f"must be in [0, 1], got {o.min_lr_ratio}")
  if not o.basis_lr_scale > 0:
    _fail("optim.basis_lr_scale", f"must be > 0, got {o.basis_lr_scale}")
  if o.basis_lr_scale != 1.0 and m.mlp_kind != "projected":
    _fail("optim.basis_lr_scale", f"scales a projected model's basis tensors; this model is "
          f"mlp_kind={m.mlp_kind!r} (leave it at 1.0)")
  if o.basis_moments not in BASIS_MOMENTS:
    _fail("optim.basis_moments", f"unknown {o.basis_moments!r}; choose one of {BASIS_MOMENTS}")
  if o.basis_moments != "float32" and m.mlp_kind == "dense":
    _fail("optim.basis_moments", f"stores the Adam moments of a PN's (or mixture's) basis "
          f"tensors; this model is mlp_kind='dense' and has none (leave it at 'float32')")
  if t.checkpoint_every_minutes < 0:
    _fail("train.checkpoint_every_minutes", f"must be >= 0 (0: off), got "
          f"{t.checkpoint_every_minutes}")
  if t.checkpoint_every < 1 or t.keep_checkpoints < 1 or t.log_every < 1 or t.eval_every < 1:
    _fail("train.checkpoint_every", "checkpoint_every, keep_checkpoints, log_every and "
          "eval_every must be >= 1")


def _validate_mesh(config: ml_collections.ConfigDict, device_count: int | None) -> None:
  m, d = config.model, config.data
  for axis in MESH_AXES:
    size = config.mesh[axis]
    if not isinstance(size, int) or (size < 1 and size != -1):
      _fail(f"mesh.{axis}", f"must be a positive integer or -1, got {size!r}")
  if sum(config.mesh[a] == -1 for a in MESH_AXES) > 1:
    _fail("mesh", "at most one mesh axis may be -1")
  if device_count is not None:
    batch_shards = mesh_shape(config, device_count)
    shards = batch_shards["data"] * batch_shards["fsdp"]
    if d.batch_size % shards:
      _fail("data.batch_size", f"global batch {d.batch_size} is not divisible by the "
            f"data*fsdp mesh size {shards}")
    if m.n_heads % batch_shards["tensor"]:
      _fail("mesh.tensor", f"tensor={batch_shards['tensor']} does not divide n_heads={m.n_heads}")


def routed(model: ml_collections.ConfigDict) -> bool:
  """Whether the model picks weights by cluster (so a cluster must be chosen to project it).

  `.get`: configs saved in checkpoints before `independent_experts` existed lack the key.
  """
  return model.mlp_kind != "dense" or bool(model.get("independent_experts", False))


def _validate_experts(config: ml_collections.ConfigDict) -> None:
  m, d = config.model, config.data
  mode = d.get("cluster_batching", "mixed")
  if mode not in CLUSTER_BATCHING:
    _fail("data.cluster_batching", f"unknown mode {mode!r}; choose one of {CLUSTER_BATCHING}")
  if mode == "stratified" and d.batch_size % m.k:
    _fail("data.batch_size", f"stratified batches give each of the k={m.k} clusters "
          f"batch_size/k rows; {d.batch_size} is not a multiple of {m.k}")
  if not m.get("independent_experts", False):
    return
  if m.mlp_kind != "dense":
    _fail("model.independent_experts", f"independent experts are copies of a dense model; set "
          f"model.mlp_kind='dense' (got {m.mlp_kind!r}) or independent_experts=False")
  if m.k < 2:
    _fail("model.independent_experts", f"needs model.k >= 2 experts, got k={m.k}")
  if mode != "stratified":
    _fail("data.cluster_batching", f"independent experts train on stratified batches (rows "
          f"[c*b, (c+1)*b) of cluster c); set data.cluster_batching='stratified', got {mode!r}")


SELECT_RULES = ("frequent", "lowest_loss", "shares")
EXPORT_FORMATS = ("pn", "hf")


def _validate_specialize(config: ml_collections.ConfigDict) -> None:
  """The specialization / distillation / sampling / export keys (absent in old saved configs:
  skipped)."""
  if "specialize" in config:
    if config.specialize.select not in SELECT_RULES:
      _fail("specialize.select", f"unknown rule {config.specialize.select!r}; choose one of "
            f"{SELECT_RULES}")
    if config.specialize.expect_kind not in ("", "independent") + MLP_KINDS:
      _fail("specialize.expect_kind", f"unknown kind {config.specialize.expect_kind!r}")
  if config.data.get("domain_tokens", 0) < 0:
    _fail("data.domain_tokens", f"must be >= 0 (0: the whole split), got "
          f"{config.data.domain_tokens}")
  if "distill" in config:
    if config.distill.temperature <= 0:
      _fail("distill.temperature", f"must be > 0, got {config.distill.temperature}")
    if not 0.0 <= config.distill.weight <= 1.0:
      _fail("distill.weight", f"must be in [0, 1], got {config.distill.weight}")
  if "prune" in config:
    pr = config.prune
    for key in ("d_model", "mlp_dim"):
      if pr[key] < 0:
        _fail(f"prune.{key}", f"must be >= 0 (0: keep init_from's), got {pr[key]}")
    if pr.calibration_batches < 1:
      _fail("prune.calibration_batches", f"must be >= 1, got {pr.calibration_batches}")
    if not pr.ridge > 0:
      _fail("prune.ridge", f"must be > 0 (it keeps the least-squares repair well posed), got "
            f"{pr.ridge}")
  if "sample" in config:
    _validate_sample(config.sample)
  if "export" in config and config.export.format not in EXPORT_FORMATS:
    _fail("export.format", f"unknown format {config.export.format!r}; choose one of "
          f"{EXPORT_FORMATS} (pn: pn-jax's safetensors layout, hf: Hugging Face transformers)")


def _validate_sample(s: ml_collections.ConfigDict) -> None:
  """The sampling flags; out of range they used to give empty or garbage samples and exit 0."""
  if not s.temperature >= 0:
    _fail("sample.temperature", f"must be >= 0 (0: greedy), got {s.temperature}")
  if s.top_k < 0:
    _fail("sample.top_k", f"must be >= 0 (0: off), got {s.top_k}")
  if not 0.0 < s.top_p <= 1.0:
    _fail("sample.top_p", f"must be in (0, 1] (1: off), got {s.top_p}")
  if s.max_new_tokens < 1:
    _fail("sample.max_new_tokens", f"must be >= 1, got {s.max_new_tokens}")
  if s.num_samples < 1:
    _fail("sample.num_samples", f"must be >= 1, got {s.num_samples}")
  if s.cluster < -1:
    _fail("sample.cluster", f"must be an expert id >= 0, or -1 (expert 0), got {s.cluster}")


def expert_of(cluster: int, model: ml_collections.ConfigDict, what: str) -> int:
  """config.sample.cluster checked against a checkpoint's model (sample, export), which is only
  known once the checkpoint is found: -> the expert to use (-1: expert 0)."""
  k = int(model.k) if routed(model) else 1
  if not -1 <= cluster < k:
    if k == 1:
      _fail("sample.cluster", f"{what} is a dense model without experts; leave sample.cluster "
            f"at -1 (got {cluster})")
    _fail("sample.cluster", f"{cluster} is not an expert of {what}: it has k={k}, use 0..{k - 1} "
          "(or -1: expert 0)")
  return max(int(cluster), 0)


def mesh_shape(config: ml_collections.ConfigDict, device_count: int) -> dict[str, int]:
  """Resolves the -1 axis and checks the mesh uses exactly `device_count` devices."""
  sizes = {a: config.mesh[a] for a in MESH_AXES}
  fixed = 1
  for a, s in sizes.items():
    if s != -1:
      fixed *= s
  auto = [a for a, s in sizes.items() if s == -1]
  if auto:
    if device_count % fixed:
      _fail("mesh", f"fixed axes {sizes} (product {fixed}) do not divide the "
            f"{device_count} available devices")
    sizes[auto[0]] = device_count // fixed
  total = 1
  for s in sizes.values():
    total *= s
  if total != device_count:
    _fail("mesh", f"mesh {sizes} uses {total} devices but {device_count} are available")
  return sizes


def small_model_config(model: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The dense model one expert of a routed model turns into (same everything but the routing).
  `model` may also be a pn_jax.model.model_config.ModelConfig (anything with `to_dict()`)."""
  small = ml_collections.ConfigDict(model.to_dict())
  small.mlp_kind = "dense"
  small.k, small.h, small.m = 1, 1, 1
  small.independent_experts = False
  small.basis_dtype = "float32"  # no basis: its formed weights are stored in param_dtype
  return small


def use_tiny(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Shrinks any run kind to a CPU-in-seconds model on the bundled tiny corpus."""
  m, d, o, t = c.model, c.data, c.optim, c.train
  m.update(vocab_size=512, d_model=64, n_layers=2, n_heads=4, mlp_dim=256, max_len=128,
           dtype="float32", remat="none")
  d.update(corpus="tiny", seq_len=64, batch_size=8, eval_batches=2)
  o.update(lr=3e-3, warmup_steps=10)
  t.update(steps=40, log_every=5, eval_every=20, checkpoint_every=20)
  return c


def use_arch(c: ml_collections.ConfigDict, name: str = "gpt") -> ml_collections.ConfigDict:
  """The config-file arg `arch=<name>` (configs/{slm,llm,pn,mix,mix_shared,quickstart}.py):
  "llama" is the gated MLP with SiLU, Llama's (docs/design.md); "gpt" leaves the model as is."""
  if name not in ARCHS:
    _fail("model.arch", f"unknown architecture {name!r}; choose one of {ARCHS}")
  c.model.arch = name
  if name == "llama":
    c.model.activation = "silu"
  return c


def load_module(path: str, what: str = "config"):
  """Executes a config-like file (configs/*.py, configs/sweeps/*.py) and returns its module.

  The one way files under configs/ are loaded outside config_flags: by tests, sweeps and
  experiments, and by config files that build on a sibling (configs/bench/gpt2_pn.py).
  """
  import importlib.util
  import os
  if not os.path.exists(path):
    raise ConfigError(f"{what} file {str(path)!r} does not exist")
  name = f"_pn_{what}_{os.path.splitext(os.path.basename(path))[0]}_{abs(hash(str(path)))}"
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
  except SyntaxError as e:
    raise syntax_error(e) from None
  return module


def syntax_error(e: SyntaxError) -> ConfigError:
  """A config/sweep file that does not compile, as one line naming the file and the line."""
  return ConfigError(f"{e.filename} line {e.lineno}: {e.msg}: fix the file's syntax")


def load_config(spec: str) -> ml_collections.ConfigDict:
  """'configs/pn.py:tiny,h=4' -> that file's get_config('tiny,h=4'), as --config loads it."""
  path, _, arg = str(spec).partition(":")
  return load_module(path, "config").get_config(arg or None)
