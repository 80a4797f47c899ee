"""Chat and prompt/completion records: parsing, rendering with the chat template, the loss mask."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_agent.data import Record, build_blocks, read_corpus, target_mask, token_ids
from edge_agent.errors import DataError
from edge_agent.tiny import CHATML
from edge_agent.train import lm_loss


class ChatTokenizer:
    """One id per character; ChatML template, rendered by transformers' own function."""

    eos_token_id = 0
    chat_template = CHATML

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict:
        return {"input_ids": [1 + (ord(c) % 200) for c in text]}

    def apply_chat_template(self, messages: list, tokenize: bool = False, add_generation_prompt: bool = False) -> str:
        from transformers.utils.chat_template_utils import render_jinja_template

        rendered, _ = render_jinja_template(conversations=[messages], chat_template=CHATML, add_generation_prompt=add_generation_prompt)
        return str(rendered[0])


def _chat(*turns: tuple[str, str]) -> dict:
    return {"messages": [{"role": r, "content": c} for r, c in turns]}


def _write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_every_kind_of_record_is_read_and_malformed_lines_are_counted_with_file_and_line(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("plain text")
    _write_jsonl(
        tmp_path / "mixed.jsonl",
        [
            {"text": "a text line"},
            _chat(("user", "hi"), ("assistant", "hello")),
            {"prompt": "2+2=", "completion": "4"},
            "not json",
            {"messages": [{"role": "wizard", "content": "x"}]},
            {"messages": [{"role": "user", "content": "only a question"}]},
            {"prompt": "no completion"},
            [1, 2],
            {"other": 1},
        ],
    )
    corpus = read_corpus(tmp_path)
    assert [r.kind for r in corpus.records] == ["text", "chat", "completion", "text"]
    assert corpus.records[1].source.endswith("mixed.jsonl:2")
    assert corpus.skipped == {"unknown": 3, "chat": 2, "completion": 1}
    where = {p.split(": ", 1)[0].rsplit(":", 1)[1]: p for p in corpus.problems}
    assert set(where) == {"4", "5", "6", "7", "8", "9"}
    assert "not JSON" in where["4"] and "'wizard'" in where["5"] and "no assistant" in where["6"] and "'completion'" in where["7"]


def test_a_directory_of_malformed_lines_only_is_a_clear_error(tmp_path: Path) -> None:
    _write_jsonl(tmp_path / "bad.jsonl", ["{", {"messages": []}])
    with pytest.raises(DataError, match=r"no usable records .* \(2 skipped\)"):
        read_corpus(tmp_path)


def test_completion_blocks_mark_only_the_completion_and_eos_as_targets() -> None:
    tok = ChatTokenizer()
    recs = [Record("completion", prompt="Q" * 7, completion="A" * 5) for _ in range(20)]
    data = build_blocks(recs, tok, 15, 0.2, seed=0)
    blocks = np.concatenate([data.train, data.heldout])
    ids = token_ids(blocks).reshape(-1)
    targets = (blocks >= 0).reshape(-1)
    q, a = 1 + ord("Q") % 200, 1 + ord("A") % 200
    assert set(ids[~targets]) == {q} and set(ids[targets]) == {a, 0}
    st_ = data.stats["completion"]
    assert (st_.records, st_.tokens, st_.target_tokens) == (20, 20 * 13, 20 * 6)
    assert st_.train_blocks + st_.heldout_blocks == len(blocks)


def test_chat_blocks_predict_the_assistant_turns_with_their_closing_tokens_only() -> None:
    tok = ChatTokenizer()
    rec = Record("chat", messages=(("system", "sys"), ("user", "uuu"), ("assistant", "AAA"), ("user", "vv"), ("assistant", "BB")))
    one = tok.apply_chat_template([{"role": r, "content": c} for r, c in rec.messages])
    data = build_blocks([rec] * 8, tok, len(one) - 1, 0.2, seed=0)  # a block is one chat: every block starts one
    assert data.stats["chat"].train_blocks + data.stats["chat"].heldout_blocks == 8
    for block in np.concatenate([data.train, data.heldout]):
        assert "".join(chr(t - 1 if t >= 0 else -t - 2) for t in block) == one
        assert "".join(chr(t - 1) for t in block if t >= 0) == "AAA<|im_end|>\nBB<|im_end|>\n"


def test_chat_needs_a_template_and_records_without_one_are_skipped_not_fatal(tmp_path: Path) -> None:
    class Plain(ChatTokenizer):
        chat_template = None

    recs = [Record("chat", messages=(("user", "q"), ("assistant", "a")), source="x.jsonl:1")] + [Record("text", text="t" * 100)] * 4
    data = build_blocks(recs, Plain(), 31, 0.2, seed=0)
    assert data.stats["chat"].records == 0 and data.stats["chat"].skipped == 1 and data.stats["text"].train_blocks > 0


@settings(max_examples=50, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(["system", "user", "assistant", "tool"]), st.text(alphabet="abcxyz <>|\n{}%", max_size=12)),
        min_size=1,
        max_size=8,
    )
)
def test_chat_rendering_masks_exactly_the_assistant_contents(turns: list[tuple[str, str]]) -> None:
    """Whatever the turns, the predicted text is the concatenation of the assistant turns
    (content and closing tag), and the whole is the template's rendering."""
    tok = ChatTokenizer()
    rec = Record("chat", messages=tuple(turns))
    from edge_agent.data import _segments

    pieces = _segments(rec, tok)
    full = tok.apply_chat_template([{"role": r, "content": c} for r, c in turns])
    assert "".join(t for t, _ in pieces) == full
    assert "".join(t for t, target in pieces if target) == "".join(f"{c}<|im_end|>\n" for r, c in turns if r == "assistant")


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=300))
def test_any_jsonl_line_is_a_record_or_a_counted_skip(tmp_path_factory: pytest.TempPathFactory, line: str) -> None:
    d = tmp_path_factory.mktemp("j")
    (d / "x.jsonl").write_text(line.replace("\n", " ") + "\n" + json.dumps({"text": "ok"}) + "\n")
    corpus = read_corpus(d)
    assert corpus.records[-1].text == "ok" and len(corpus.records) + sum(corpus.skipped.values()) <= 2


def test_prompt_tokens_get_zero_gradient(tiny_model: Path) -> None:
    """The masked loss's gradient is the gradient of the cross-entropy over the completion
    targets alone, and differs from the unmasked loss's."""
    from compression.protocol import TrainableSpec
    from edge_agent.model import attach_lora, load_base

    model, tok = load_base(str(tiny_model), "none")
    model = attach_lora(model, TrainableSpec(r=4, alpha=8, targets=("q_proj", "v_proj")))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)  # B = 0 would zero A's gradient
    recs = [Record("completion", prompt="def add(a, b): ", completion="return a + b") for _ in range(12)]
    data = build_blocks(recs, tok, 24, 0.2, seed=0)
    batch = data.train[:3]
    keep = target_mask(batch)
    assert keep is not None and 0 < keep.sum() < keep.size
    params = [p for p in model.parameters() if p.requires_grad]

    def grads(loss: torch.Tensor) -> torch.Tensor:
        return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)])

    masked = grads(lm_loss(model, batch))
    chunked = grads(lm_loss(model, batch, chunk_tokens=7))
    ids = torch.from_numpy(token_ids(batch))
    logits = model(input_ids=ids).logits[:, :-1].reshape(-1, model.config.vocab_size)
    ce = torch.nn.functional.cross_entropy(logits, ids[:, 1:].reshape(-1), reduction="none")
    by_hand = grads(ce[torch.from_numpy(keep.reshape(-1))].mean())
    unmasked = grads(lm_loss(model, token_ids(batch)))
    torch.testing.assert_close(masked, by_hand, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(chunked, by_hand, rtol=1e-4, atol=1e-6)
    assert not torch.allclose(masked, unmasked, rtol=1e-2, atol=1e-4)


def test_a_batch_whose_only_input_only_token_is_the_first_still_decodes_its_ids(tiny_model: Path) -> None:
    """The first token of a block is never a target, so a block that starts inside a prompt
    and predicts the rest has no mask, but still holds an encoded (negative) id."""
    from edge_agent.model import load_base

    model, _ = load_base(str(tiny_model), "none")
    plain = np.random.default_rng(0).integers(0, 500, size=(2, 16))
    encoded = plain.copy()
    encoded[:, 0] = -encoded[:, 0] - 1
    assert target_mask(encoded) is None
    with torch.no_grad():
        torch.testing.assert_close(lm_loss(model, encoded), lm_loss(model, plain))
        torch.testing.assert_close(lm_loss(model, encoded, chunk_tokens=5), lm_loss(model, plain, chunk_tokens=5))
