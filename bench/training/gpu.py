"""Random-initialised models built from a config, a one-token-per-word tokenizer, and MFU.

Nothing travels to a GPU machine but the working tree, so the GPU variant of the benchmark builds
its model from a config (same architecture as SmolLM2-135M, or a ~1B Llama) with random weights and
a synthetic word-level tokenizer with a chat template; speed and memory do not depend on the
weights' values. The `tiny` config lets the CPU smoke test exercise the same path.

MFU (model FLOPs utilisation) = 6 · N · (tokens forwarded per second) / peak FLOP/s, with N the base
model's parameter count. 6N is the usual full fine-tuning convention (forward 2N, backward 4N per
token); LoRA skips the frozen weights' gradients (about 4N per token), so the hardware does less
than 6N and the 6N figure is the conventional, optimistic one. Attention's own FLOPs are ignored
(sequences here are short).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# LlamaConfig keyword arguments. smollm2-135m = the bundled model's config.json; llama-1b = the
# shape of Llama-3.2-1B (vocab 128256, 16 layers, hidden 2048, GQA 32/8 heads, tied embeddings).
GPU_CONFIGS: dict[str, dict[str, Any]] = {
    "smollm2-135m": {
        "vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536,
        "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
        "head_dim": 64, "max_position_embeddings": 8192, "rms_norm_eps": 1e-5,
        "rope_parameters": {"rope_type": "default", "rope_theta": 100000.0},
        "tie_word_embeddings": True,
    },
    "llama-1b": {
        "vocab_size": 128256, "hidden_size": 2048, "intermediate_size": 8192,
        "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8,
        "head_dim": 64, "max_position_embeddings": 8192, "rms_norm_eps": 1e-5,
        "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0},
        "tie_word_embeddings": True,
    },
    "tiny": {
        "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 16, "max_position_embeddings": 1024, "rms_norm_eps": 1e-5,
        "tie_word_embeddings": True,
    },
}  # fmt: skip
# Dense bf16 tensor-core peaks (FLOP/s) from the vendors' data sheets; matched on the device name.
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
)
SPECIAL_TOKENS = ("<pad>", "<eos>", "<|im_start|>", "<|im_end|>")
ROLE_WORDS = ("system", "user", "assistant")
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|> {{ m['role'] }} {{ m['content'] }} <|im_end|> "
    "{% endfor %}{% if add_generation_prompt %}<|im_start|> assistant {% endif %}"
)


def build_random_model(name: str, out_dir: Path, seed: int = 0) -> Path:
    """Save a random-initialised Llama of config `name` (bf16 on disk) and a word tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    values: dict[str, Any] = {**GPU_CONFIGS[name], "pad_token_id": 0, "eos_token_id": 1,
                              "bos_token_id": 1}  # fmt: skip
    config = LlamaConfig(**values)
    torch.manual_seed(seed)
    model: Any = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = 1
    out_dir.mkdir(parents=True, exist_ok=True)
    model.to(torch.bfloat16).save_pretrained(str(out_dir))
    save_word_tokenizer(out_dir, config.vocab_size)
    (out_dir / "bench_model.json").write_text(json.dumps({"config": name, "seed": seed}))
    return out_dir


def word_vocab_size(vocab_size: int) -> int:
    """How many `w<i>` words the tokenizer holds (the rest of the ids are specials and roles)."""
    return vocab_size - len(SPECIAL_TOKENS) - len(ROLE_WORDS)


def save_word_tokenizer(out_dir: Path, vocab_size: int) -> None:
    """A word-level tokenizer (one token per whitespace-separated word) with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    names = [*SPECIAL_TOKENS, *ROLE_WORDS]
    names += [f"w{i}" for i in range(word_vocab_size(vocab_size))]
    vocab = {word: i for i, word in enumerate(names)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<eos>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        eos_token="<eos>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(str(out_dir))


def parameter_count(model_dir: Path) -> int:
    """Parameters of the model in `model_dir` (tied embeddings counted once)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(model_dir))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def peak_flops(device_name: str, override_tflops: float | None = None) -> tuple[float | None, str]:
    """(peak bf16 FLOP/s, where the figure comes from) for a CUDA device name."""
    if override_tflops:
        return override_tflops * 1e12, "--peak-tflops"
    for key, flops in PEAK_BF16_FLOPS:
        if key.lower() in device_name.lower():
            return flops, f"{key} dense bf16 data-sheet peak"
    return None, "unknown device: give --peak-tflops"
