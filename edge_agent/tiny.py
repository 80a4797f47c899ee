"""A tiny model with its own BPE tokenizer, for tests and for machines without SmolLM2.

By default it has SmolLM2's architecture (Llama, tied embeddings) at 2 layers and hidden
size 64, so every code path is exercised in milliseconds. ``arch`` builds the same size of
Qwen2, Phi-3, Gemma 2 or GPT-2 instead.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
"""The tiny model's chat template: ChatML, as SmolLM2-Instruct's (without its default system turn)."""


ARCHS = ("llama", "qwen2", "phi3", "gemma2", "gpt2")
"""Architectures :func:`build_tiny_model` builds: the families users bring."""
LORA_TARGETS: dict[str, tuple[str, ...]] = {
    "llama": ("q_proj", "v_proj"),
    "qwen2": ("q_proj", "v_proj"),
    "phi3": ("qkv_proj",),  # one fused projection
    "gemma2": ("q_proj", "v_proj"),
    "gpt2": ("c_attn",),  # a Conv1D holding q, k and v
}
"""The usual LoRA targets of each architecture (``model.targets`` for its fleet)."""


def _tiny_config(arch: str, vocab: int, tok: Any) -> Any:
    """A 2-layer, 64-wide config of ``arch`` with ``tok``'s special tokens."""
    import transformers

    ids = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    if arch == "gpt2":
        return transformers.GPT2Config(vocab_size=vocab, n_embd=64, n_layer=2, n_head=4, n_positions=512, **ids)
    common = {
        "vocab_size": vocab,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "tie_word_embeddings": True,
        **ids,
    }
    if arch == "llama":
        return transformers.LlamaConfig(**common)
    if arch == "qwen2":
        return transformers.Qwen2Config(**common)
    if arch == "phi3":
        return transformers.Phi3Config(**common)
    if arch == "gemma2":
        return transformers.Gemma2Config(**common, head_dim=16, sliding_window=64)
    raise ValueError(f"unknown architecture {arch!r}; expected one of {', '.join(ARCHS)}")


def build_tiny_model(out_dir: str | Path, texts: Iterable[str], *, vocab_size: int = 512, seed: int = 0, arch: str = "llama") -> Path:
    """Train a BPE tokenizer on ``texts`` and write a random-init tiny model of ``arch`` to ``out_dir``."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="</s>")
    fast.chat_template = CHATML
    fast.save_pretrained(str(out))
    config = _tiny_config(arch, tok.get_vocab_size(), fast)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(str(out))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build the tiny test model from a directory of text files.")
    parser.add_argument("--out", required=True, help="output model directory")
    parser.add_argument("--text-dir", required=True, help="directory whose .txt/.md files train the tokenizer")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--arch", choices=ARCHS, default="llama")
    args = parser.parse_args(argv)
    texts = [p.read_text(encoding="utf-8", errors="replace") for p in sorted(Path(args.text_dir).rglob("*")) if p.suffix in (".txt", ".md")]
    if not texts:
        parser.error(f"no .txt or .md files under {args.text_dir}")
    build_tiny_model(args.out, texts, seed=args.seed, arch=args.arch)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
