"""Type stub of the native module ``loratch._loratch`` (hand-written; checked by mypy.stubtest)."""

import os
from typing import final, overload

import torch

__all__ = [
    "LoraLinear",
    "Optimizer",
    "Scheduler",
    "Tokenizer",
    "TORCH_VERSION",
    "__version__",
    "torch_lora_apply_to_linear",
    "torch_lora_forward",
    "torch_lora_forward_with_gradients",
    "torch_lora_linear",
    "torch_lora_load_adapters",
    "torch_lora_merge_weights",
    "torch_lora_save_adapters",
    "torch_lora_trainable_params",
    "torch_lora_unmerge_weights",
    "torch_hf_forward",
    "torch_hf_generate",
    "torch_hf_loss",
    "torch_hf_gradient_checkpointing",
    "torch_hf_list_models",
    "torch_hf_load_model_lora",
    "torch_hf_lora_enable",
    "torch_hf_lora_get_parameters",
    "torch_hf_lora_init",
    "torch_hf_lora_load",
    "torch_hf_lora_save",
    "torch_hf_lora_merge",
    "torch_hf_lora_named_parameters",
    "torch_hf_lora_unmerge",
    "torch_hf_memory_report",
    "torch_hf_memory_usage",
    "torch_hf_save_merged",
    "_train",
    "_inspect_data",
    "torch_hf_set_training",
    "torch_hf_tokenizer_load",
    "torch_hf_unload",
    "torch_backward",
    "torch_clip_grad_norm",
    "torch_lr_scheduler",
    "torch_mps_synchronize",
    "torch_optimizer_add_params",
    "torch_optimizer_step",
    "torch_optimizer_zero_grad",
    "torch_scheduler_get_lr",
    "torch_scheduler_step",
    "torch_set_grad_enabled",
]

__version__: str
TORCH_VERSION: str

@final
class LoraLinear:
    """A linear layer ``y = x W^T + b`` with a LoRA adapter ``scaling * B(A(dropout(x)))``."""

    @property
    def weight(self) -> torch.Tensor:
        """The frozen base weight ``[out_features, in_features]`` (live)."""
    @property
    def bias(self) -> torch.Tensor | None:
        """The frozen bias ``[out_features]`` (live), or None."""
    @property
    def lora_A(self) -> torch.Tensor:
        """LoRA A ``[rank, in_features]`` (live, requires grad)."""
    @property
    def lora_B(self) -> torch.Tensor:
        """LoRA B ``[out_features, rank]`` (live, requires grad)."""
    @property
    def rank(self) -> int: ...
    @property
    def alpha(self) -> float: ...
    @property
    def dropout(self) -> float: ...
    @property
    def use_rslora(self) -> bool: ...
    @property
    def scaling(self) -> float:
        """``alpha / rank``, or ``alpha / sqrt(rank)`` with rsLoRA."""
    @property
    def merged(self) -> bool: ...
    @property
    def training(self) -> bool: ...
    @property
    def in_features(self) -> int: ...
    @property
    def out_features(self) -> int: ...
    @property
    def dtype(self) -> str:
        """The dtype name, e.g. ``"float32"``."""
    @property
    def device(self) -> str:
        """The device name, e.g. ``"cpu"`` or ``"cuda:0"``."""
    def train(self) -> LoraLinear:
        """Training mode (dropout active). Returns the layer."""
    def eval(self) -> LoraLinear:
        """Evaluation mode (dropout off). Returns the layer."""

def torch_lora_linear(
    in_features: int,
    out_features: int,
    rank: int,
    alpha: float,
    *,
    bias: bool = True,
    dropout: float = 0.0,
    use_rslora: bool = False,
    dtype: str = "float32",
    device: str = "cpu",
) -> LoraLinear:
    """Create a LoRA linear layer. The base weight and bias are initialised like
    ``torch.nn.Linear`` and frozen; A is kaiming-uniform (a=sqrt(5)), B zeros.

    Raises:
        ConfigError: rank <= 0, alpha <= 0, dropout outside [0, 1), features <= 0.
        DTypeError: unknown dtype name.
        DeviceError: unknown or unavailable device.
    """

def torch_lora_apply_to_linear(
    linear: torch.nn.Linear,
    rank: int,
    alpha: float,
    *,
    dropout: float = 0.0,
    use_rslora: bool = False,
) -> LoraLinear:
    """Wrap a ``torch.nn.Linear``. Its weight and bias are **shared, not copied** (merging writes
    into them) and frozen (``requires_grad=False``). A and B take the weight's dtype and device."""

def torch_lora_forward(layer: LoraLinear, x: torch.Tensor) -> torch.Tensor:
    """``x W^T + b + scaling * B(A(dropout(x)))`` for ``x`` of shape ``[..., in_features]``.

    Raises:
        TypeError: x is not a tensor.
        ShapeError: the last dim of x is not in_features.
        DTypeError: x's dtype differs from the layer's.
        DeviceError: x is on another device.
    """

def torch_lora_forward_with_gradients(
    layer: LoraLinear, x: torch.Tensor, retain_graph: bool = False
) -> torch.Tensor:
    """The forward with autograd recording forced on (even inside ``torch.no_grad()``).
    With ``retain_graph=True`` the output also keeps its ``.grad`` after backward."""

def torch_lora_merge_weights(layer: LoraLinear) -> None:
    """``W += scaling * B @ A`` (float32 math); later forwards skip the adapter.

    Raises:
        StateError: already merged.
        NonFiniteError: the delta has NaN/Inf (W is left untouched).
    """

def torch_lora_unmerge_weights(layer: LoraLinear) -> None:
    """``W -= scaling * B @ A``. Raises StateError if not merged."""

def torch_lora_trainable_params(model: object) -> list[torch.Tensor]:
    """The live ``[lora_A, lora_B]`` (``requires_grad=True``), for any optimizer: of a
    ``LoraLinear``; of every ``LoraLinear`` held by a list, tuple, dict or object (a
    ``torch.nn.Module`` with them as attributes), in order, each once; or, for a string, of the
    loaded model of that name (as ``torch_hf_lora_get_parameters``).

    Raises:
        TypeError: ``model`` holds no ``LoraLinear``.
        ModelNotFoundError: no model of that name is loaded.
    """

def torch_lora_save_adapters(layer: LoraLinear, path: str | os.PathLike[str]) -> None:
    """Save A, B and metadata (rank, alpha, features, use_rslora) as safetensors, or, for a
    ``.pt``/``.pth``/``.bin`` path (as ``torch_hf_lora_save``), as a ``torch.save`` file of the two
    tensors with the metadata in an extra record (so a fresh layer loads it); atomically."""

def torch_lora_load_adapters(layer: LoraLinear, path: str | os.PathLike[str]) -> None:
    """Load adapters saved by ``torch_lora_save_adapters`` into the layer, in place.

    Raises:
        FileNotFoundError: no such file.
        AdapterFormatError: corrupt/truncated file, or rank/alpha/shape mismatch.
        StateError: the layer is merged.
    """

# --- HuggingFace LoRA API -------------------------------------------------------------------

def torch_hf_load_model_lora(
    model_name: str,
    path: str | os.PathLike[str],
    config: dict[str, str] | None = None,
    *,
    revision: str | None = None,
) -> str:
    """Load a Hugging Face model directory (config.json + model.safetensors or shards) or a GGUF
    file under ``model_name``, replacing any model of that name (a failed load keeps it).
    ``path`` may also be a Hub id (``"owner/name"``, or ``"owner/name@revision"``) that is not a
    local path: its snapshot in the local Hugging Face cache (``HF_HUB_CACHE``, else
    ``HF_HOME/hub``, else ``~/.cache/huggingface/hub``), never downloaded; ``revision`` (a ref
    name such as "main", or a commit hash) picks the snapshot.
    ``config``: ``device`` ("cpu", "cuda[:N]", "mps"), ``dtype`` ("float32" default, "bfloat16",
    "float16") and ``quantize`` (absent: as stored; "none": a GGUF decoded to float; "q8_0",
    "q4_0", "nf4": the projections, head and embedding quantized on load, decoded on use).
    Returns the name.

    Supported: LlamaForCausalLM (incl. rope_scaling "llama3"), MistralForCausalLM,
    Qwen2ForCausalLM, Qwen3ForCausalLM; GGUF architectures llama, qwen2, qwen3.

    Raises:
        FileNotFoundError: no directory or file, config.json or weights; a Hub id not in the
            cache (the message names the cache directory and ``hf download owner/name``).
        ConfigError: malformed config.json, unsupported architecture, unknown config key or
            ``quantize`` name.
        CheckpointError: corrupt or truncated weights or GGUF file, missing or mis-shaped
            tensors, unsupported GGUF architecture or tensor type (the message names the file
            and the tensor or key).
        DeviceError / DTypeError: bad ``device`` / ``dtype``.
    """

def torch_hf_unload(model_name: str) -> None:
    """Remove a model from the registry (its memory is freed once no call uses it)."""

def torch_hf_list_models() -> list[str]:
    """Names of the loaded models, sorted."""

def torch_hf_forward(
    model_name: str, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Logits ``[B, T, vocab]`` for int64 ``input_ids`` ``[B, T]`` (or ``[T]``: B = 1).
    ``attention_mask`` (1 = token, 0 = padding; left or right) makes padded rows equal to
    unpadded runs at their real tokens. Autograd reaches the LoRA tensors.

    With gradients recorded (training), a float32 CPU forward runs loratch's fused RMSNorm,
    rotary embedding and SwiGLU/GeGLU, and (at most 512 tokens, no ``attention_mask`` or one of
    ones only) its blocked causal attention, which skips the products the causal mask hides, as
    the trainer does; its logits agree with the
    no-grad forward (libtorch's ops, as transformers runs them) to float rounding (about 1e-6),
    not bit for bit.

    Raises:
        ModelNotFoundError: unknown name (the message lists the loaded ones).
        DTypeError / ShapeError / InputError: bad ids (float, 3-D, empty, id >= vocab or < 0).
    """

def torch_hf_loss(
    model_name: str,
    input_ids: torch.Tensor,
    labels: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """transformers' ``model(input_ids, labels=labels, attention_mask=attention_mask).loss``,
    computed as loratch's trainer computes its loss: the mean cross-entropy over the target
    tokens, through the output head in chunks and a fused cross-entropy, so the
    ``[tokens, vocab]`` logits never exist. Returns a float32 0-dim tensor whose backward
    (``torch_backward(loss)``) reaches the LoRA tensors.

    ``labels`` (int64 ``[B, T]`` like ``input_ids``; default: ``input_ids``) are shifted inside:
    ``labels[:, t + 1]`` is the target of position ``t``. Positions labelled ``-100`` are left
    out of the mean. As in transformers, ``attention_mask`` does not mask the loss: padding
    positions count unless their labels are ``-100`` (label padding ``-100`` to leave it out).
    With no target token the loss is NaN and the gradients zero, as transformers' mean over
    none. Gemma 2's final-logit soft-capping is applied as transformers applies it.

    Raises:
        ModelNotFoundError: unknown name.
        DTypeError / ShapeError / InputError: bad ids or labels (float, shape unlike
            ``input_ids``, a label outside ``[0, vocab)`` other than -100).
    """

def torch_hf_lora_init(
    model_name: str,
    rank: int,
    alpha: float,
    target_modules: list[str] | str,
    dtype: str = "float32",
    *,
    dropout: float = 0.0,
    use_rslora: bool = False,
    layers: list[int] | None = None,
) -> bool:
    """Lay fresh adapters (A kaiming-uniform, B zeros: the output is unchanged) on the target
    modules, replacing any existing ones. ``target_modules``: short names (``"q_proj"``, ...,
    ``"down_proj"``) or full paths, ``"all-linear"`` (every linear but the output head), or a
    regex string matching whole module paths (PEFT's rules). ``layers`` restricts to those
    decoder layers. Writes one line to ``sys.stderr`` saying what was adapted (``LoRA on 30
    layers x [q_proj v_proj] (60 modules)``) and warns with ``loratch.LoraWarning`` when a target
    matched only some of the layers that have such a module (not when ``layers`` chose them).

    Raises:
        ConfigError: unknown target name (the message lists the valid ones), rank/alpha <= 0.
    """

def torch_hf_lora_get_parameters(model_name: str) -> list[torch.Tensor]:
    """The live adapter tensors, ordered by layer, then module (q, k, v, o, gate, up, down),
    A before B. Raises StateError before ``torch_hf_lora_init``."""

def torch_hf_lora_named_parameters(model_name: str) -> dict[str, torch.Tensor]:
    """The live adapter tensors keyed by PEFT file keys
    (``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``), same order."""

def torch_hf_lora_enable(model_name: str, enable: bool) -> None:
    """Enable or disable the adapters; disabled gives exactly the base model's logits
    (a merged model is unmerged first)."""

def torch_hf_lora_merge(model_name: str) -> None:
    """Fold the adapters into the base weights (fp32 math). NaN/Inf deltas raise
    NonFiniteError and leave every weight unchanged; merging twice raises StateError."""

def torch_hf_lora_unmerge(model_name: str) -> None:
    """Take the adapters back out of the base weights."""

def torch_hf_set_training(model_name: str, training: bool) -> None:
    """Training mode (adapter dropout active) or evaluation mode (the default after loading)."""

def torch_hf_gradient_checkpointing(model_name: str, enabled: bool) -> None:
    """Activation checkpointing on or off (off after loading): forwards that record gradients keep
    only each decoder layer's input and run the layer again in the backward. Less memory for the
    activations, about one more forward of compute; losses and gradients are unchanged (bit for bit
    on CPU). Unknown names raise ``ModelNotFoundError``."""

def torch_hf_memory_usage(model_name: str) -> int:
    """Bytes held by the model: the sum of ``torch_hf_memory_report``'s parts, ``weights`` (the
    base weights as held: quantized blocks as stored, a tied head counted once), ``adapters`` (A
    and B), ``adapter_grads`` (their gradients when allocated) and ``optimizer_state`` (the AdamW
    moments of live ``loratch.Optimizer`` objects over its adapters). Activations, KV caches and
    torch's allocator caches are not counted."""

def torch_hf_memory_report(model_name: str) -> dict[str, int]:
    """The parts of ``torch_hf_memory_usage``: ``weights``, ``adapters``, ``adapter_grads``,
    ``optimizer_state``, ``total``."""

def torch_hf_lora_save(model_name: str, path: str | os.PathLike[str]) -> None:
    """Save the adapters in PEFT's format (float32): a directory with ``adapter_config.json`` +
    ``adapter_model.safetensors`` for a path without extension, a single ``.safetensors`` file
    with the adapter config in its metadata, or for ``.pt``/``.pth``/``.bin`` a ``torch.save``
    file of the tensors (PEFT's legacy ``adapter_model.bin``) with the adapter config in an extra
    record ``torch.load`` ignores, so it loads into a fresh model. For ``.gguf``, a
    llama.cpp LoRA adapter (``llama-cli -m base.gguf --lora adapter.gguf``): f32 tensors under
    llama.cpp's names, one ``adapter.lora.alpha`` giving every module loratch's scaling (rank or
    alpha patterns that no single alpha reproduces, or a LoRA on a tied output head, raise
    ConfigError). Writes are atomic."""

def torch_hf_lora_load(model_name: str, path: str | os.PathLike[str]) -> None:
    """Load PEFT adapters (loratch's or PEFT's own: list, regex or "all-linear" targets,
    rank_pattern/alpha_pattern, use_rslora) from a directory (``adapter_model.safetensors`` or
    legacy ``adapter_model.bin``), a ``.safetensors`` file, or a ``.pt``/``.pth``/``.bin`` file
    (read without executing any pickled code; with the config record loratch writes, or else
    fitting the LoRA already initialised). Initialises LoRA from the adapter's config when
    needed. Missing, unexpected or mis-shaped tensors, or a layout different from the
    initialised LoRA, raise AdapterFormatError and leave the model unchanged."""

@overload
def torch_hf_generate(
    model_name: str,
    input_ids: torch.Tensor | list[int],
    max_new_tokens: int,
    *,
    eos_token_id: int | list[int] | None = None,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    greedy: bool = False,
    seed: int | None = None,
) -> list[int]:
    """Generate up to ``max_new_tokens`` after one prompt (``[T]``, ``[1, T]`` or a list of ids)
    with a KV cache; returns the new token ids only (a reached stop token included). Greedy
    with ``greedy=True`` (equals transformers' greedy ``generate``); otherwise samples with
    ``temperature``, ``top_k``, ``top_p`` from a generator seeded by ``seed``."""

@overload
def torch_hf_generate(
    model_name: str,
    input_ids: list[list[int]] | list[torch.Tensor],
    max_new_tokens: int,
    *,
    eos_token_id: int | list[int] | None = None,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    greedy: bool = False,
    seed: int | None = None,
) -> list[list[int]]:
    """A list of prompts: generated as one left-padded batch (as transformers pads for
    generation), each row stopping at its own stop token; returns each prompt's new tokens,
    equal to that prompt generated alone up to float rounding."""

# --- Tokenizer ---------------------------------------------------------------------------------

@final
class Tokenizer:
    """A model's tokenizer: Hugging Face ``tokenizer.json`` (the ``tokenizers`` crate), special
    tokens from ``tokenizer_config.json``, and the model's Jinja chat template."""

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...
    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str: ...
    def token_to_id(self, token: str) -> int | None: ...
    def id_to_token(self, id: int) -> str | None: ...
    @property
    def vocab_size(self) -> int:
        """Vocabulary size including added tokens (``len(tokenizer)`` in transformers)."""
    @property
    def bos_token(self) -> str | None: ...
    @property
    def eos_token(self) -> str | None: ...
    @property
    def pad_token(self) -> str | None: ...
    @property
    def bos_token_id(self) -> int | None: ...
    @property
    def eos_token_id(self) -> int | None: ...
    @property
    def pad_token_id(self) -> int | None: ...
    def apply_chat_template(
        self, messages: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> str:
        """Render ``messages`` (dicts with "role" and "content") with the model's chat template,
        exactly as transformers' ``apply_chat_template(..., tokenize=False)``."""

def torch_hf_tokenizer_load(path: str | os.PathLike[str], *, revision: str | None = None) -> Tokenizer:
    """Load a tokenizer from a model directory (``tokenizer.json`` + ``tokenizer_config.json``
    + chat template), from a ``tokenizer.json`` path, from a GGUF file's metadata
    (``tokenizer.ggml.*``, ``tokenizer.chat_template``), or from a Hub id in the local Hugging
    Face cache (``revision`` as in ``torch_hf_load_model_lora``). Raises FileNotFoundError,
    TokenizerError or CheckpointError (a corrupt GGUF)."""

# --- Optimizer and scheduler -----------------------------------------------------------------

@final
class Optimizer:
    """AdamW (``torch.optim.AdamW``'s algorithm) with float32 state; bf16/fp16 parameters get
    float32 master copies."""

    @property
    def lr(self) -> float: ...
    @property
    def step_count(self) -> int: ...
    @property
    def params(self) -> list[torch.Tensor]: ...
    @property
    def state_bytes(self) -> int:
        """Bytes of optimizer state (moments and masters)."""

@final
class Scheduler:
    """A learning-rate schedule that sets its optimizer's LR."""

    @property
    def step_count(self) -> int: ...

def torch_optimizer_add_params(
    params: list[torch.Tensor],
    learning_rate: float,
    weight_decay: float,
    *,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-08,
) -> Optimizer:
    """AdamW over live tensors (leaves with ``requires_grad``). Raises ConfigError for invalid
    hyper-parameters or parameters."""

def torch_optimizer_zero_grad(optimizer: Optimizer) -> None:
    """Set every parameter's ``.grad`` to None (torch.optim's default)."""

def torch_optimizer_step(optimizer: Optimizer) -> None:
    """One AdamW step; parameters without a gradient are skipped."""

def torch_clip_grad_norm(optimizer: Optimizer, max_norm: float) -> float:
    """Clip the gradients' total 2-norm to ``max_norm`` in place; return the norm before
    clipping (as ``torch.nn.utils.clip_grad_norm_``)."""

def torch_backward(loss: torch.Tensor, retain_graph: bool = False) -> None:
    """``loss.backward(retain_graph=retain_graph)``."""

def torch_lr_scheduler(
    optimizer: Optimizer, scheduler_type: str, config: dict[str, float] | None = None
) -> Scheduler:
    """A schedule: "linear_warmup_cosine", "cosine", "linear", "linear_warmup_linear",
    "exponential", "step" or "constant". Config keys: ``initial_lr`` (default: the optimizer's
    LR), ``min_lr`` (0), ``total_steps`` (1000), ``warmup_steps`` (0), ``gamma`` (0.1),
    ``step_size`` (100). Sets the optimizer's LR for step 0. The LR stays in
    [min_lr, initial_lr] and holds after ``total_steps``. Invalid configs raise ConfigError."""

def torch_scheduler_step(scheduler: Scheduler) -> None:
    """Advance one step and set the optimizer's LR."""

def torch_scheduler_get_lr(scheduler: Scheduler) -> float:
    """The LR of the current step."""

def torch_set_grad_enabled(flag: bool) -> bool:
    """Turn autograd recording on or off for this thread; returns the previous setting."""

def torch_mps_synchronize() -> bool:
    """Wait for queued accelerator work: MPS where present (``torch.mps.synchronize``), else every
    CUDA device. True if something was synchronised, False on a CPU-only machine."""

def torch_hf_save_merged(model_name: str, path: str | os.PathLike[str]) -> None:
    """Write the model with its adapters merged (fp32 math; the loaded model is unchanged) as a
    Hugging Face directory: config.json, model.safetensors and the tokenizer files. ``path``
    must not exist or be empty."""

def _train(
    config_json: str, resume: str | os.PathLike[str] | None = None, dist: object | None = None
) -> dict[str, object]:
    """Run the Rust trainer on a JSON configuration (use ``loratch.train``)."""

def _inspect_data(
    *,
    config_json: str | None = None,
    config_path: str | os.PathLike[str] | None = None,
    show: int = 3,
) -> dict[str, object]:
    """Run the data inspector on a JSON configuration or a config file (use
    ``loratch.inspect_data``)."""
