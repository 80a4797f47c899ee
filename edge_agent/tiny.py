"""A tiny Llama model with its own BPE tokenizer, for tests and for machines without SmolLM2.

It has the same architecture as SmolLM2 (Llama, tied embeddings) at 2 layers and
hidden size 64, so every code path is exercised in milliseconds.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Iterable
from pathlib import Path

log = logging.getLogger(__name__)

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
"""The tiny model's chat template: ChatML, as SmolLM2-Instruct's (without its default system turn)."""


def build_tiny_model(out_dir: str | Path, texts: Iterable[str], *, vocab_size: int = 512, seed: int = 0) -> Path:
    """Train a BPE tokenizer on ``texts`` and write a random-init tiny Llama to ``out_dir``."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

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
    config = LlamaConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(str(out))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build the tiny test model from a directory of text files.")
    parser.add_argument("--out", required=True, help="output model directory")
    parser.add_argument("--text-dir", required=True, help="directory whose .txt/.md files train the tokenizer")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    texts = [p.read_text(encoding="utf-8", errors="replace") for p in sorted(Path(args.text_dir).rglob("*")) if p.suffix in (".txt", ".md")]
    if not texts:
        parser.error(f"no .txt or .md files under {args.text_dir}")
    build_tiny_model(args.out, texts, seed=args.seed)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
