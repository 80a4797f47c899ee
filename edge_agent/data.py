"""The local text pipeline: files -> records -> token blocks -> a train split and a held-out split.

The text never leaves this module as text: the rest of the agent sees token ids only,
and only parameter deltas are ever published.

Three kinds of record (``docs/agent.md#local-data``):

- ``text``: a ``.txt`` or ``.md`` file, or a ``.jsonl`` line ``{"text": ...}``; every token
  is a training target;
- ``chat``: a ``.jsonl`` line ``{"messages": [{"role": ..., "content": ...}, ...]}``, rendered
  with the tokenizer's chat template; only the assistant's turns are targets;
- ``completion``: a ``.jsonl`` line ``{"prompt": ..., "completion": ...}``; only the
  completion is a target.

A block stores a token that is not a target (a prompt or a user turn) as ``-(id + 1)``:
:func:`token_ids` gives the ids back, and :func:`target_mask` which of them the loss
predicts. Each kind is cut into blocks and split on its own, so ``check`` can say what each
holds. A malformed line is logged with its ``file:line``, skipped and counted.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edge_agent.errors import DataError

log = logging.getLogger(__name__)

TEXT_SUFFIXES = (".txt", ".md")
MAX_FILE_BYTES = 32 << 20
KINDS = ("text", "chat", "completion")
ROLES = ("system", "user", "assistant", "tool")
MAX_MESSAGES = 256
"""Messages in one chat record; rendering is quadratic in them, so more is refused."""
LOGGED_PROBLEMS = 20
"""Malformed lines logged one by one; the rest are only counted."""


@dataclass(frozen=True)
class Record:
    """One document: plain text, a chat (``(role, content)`` pairs) or a prompt and its completion."""

    kind: str
    text: str = ""
    source: str = ""
    """Where it came from: ``file`` or ``file:line``."""
    messages: tuple[tuple[str, str], ...] = ()
    prompt: str = ""
    completion: str = ""


@dataclass
class Corpus:
    """What a data directory holds: its records, and what was skipped and why."""

    records: list[Record]
    files: int
    skipped: Counter[str] = field(default_factory=Counter)
    """Skipped lines (or files) by kind of record, ``"unknown"`` when it could not be told."""
    problems: list[str] = field(default_factory=list)
    """The first :data:`LOGGED_PROBLEMS` reasons, each naming ``file:line``."""

    def skip(self, kind: str, where: str, why: str) -> None:
        self.skipped[kind] += 1
        if len(self.problems) < LOGGED_PROBLEMS:
            self.problems.append(f"{where}: {why}")
            log.warning("%s: %s; skipped", where, why)
        elif len(self.problems) == LOGGED_PROBLEMS:
            self.problems.append("... further problems are counted, not logged")
            log.warning("further malformed records are counted, not logged")

    def count(self, kind: str) -> int:
        return sum(1 for r in self.records if r.kind == kind)


@dataclass(frozen=True)
class KindStats:
    """What one kind of record contributed: records, tokens, train and held-out blocks."""

    records: int
    skipped: int
    tokens: int
    target_tokens: int
    train_blocks: int
    heldout_blocks: int


@dataclass(frozen=True)
class LocalData:
    """Token blocks of ``seq_len + 1`` ids, split deterministically into train and held-out.

    A negative entry ``-(id + 1)`` is token ``id`` that the loss does not predict."""

    train: np.ndarray
    heldout: np.ndarray
    num_files: int
    stats: dict[str, KindStats] = field(default_factory=dict)

    def batches(self, rng: np.random.Generator, batch_size: int, steps: int, replace: bool = True) -> list[np.ndarray]:
        """``steps`` random batches drawn from the train split; with ``replace=False`` each batch
        is ``batch_size`` distinct blocks drawn uniformly (all of them, if there are fewer)."""
        if replace:
            idx = rng.integers(0, len(self.train), size=(steps, batch_size))
            return [self.train[row] for row in idx]
        k = min(batch_size, len(self.train))
        return [self.train[np.sort(rng.choice(len(self.train), size=k, replace=False))] for _ in range(steps)]


def token_ids(blocks: np.ndarray) -> np.ndarray:
    """The token ids of ``blocks``, targets or not."""
    return np.where(blocks < 0, -blocks - 1, blocks)


def target_mask(blocks: np.ndarray) -> np.ndarray | None:
    """Which positions of ``blocks[:, 1:]`` the loss predicts; ``None`` when all of them."""
    targets = blocks[:, 1:] >= 0
    return None if bool(targets.all()) else targets


# -- reading ---------------------------------------------------------------------------


def read_corpus(data_dir: str | Path) -> Corpus:
    """Every record under ``data_dir``: .txt and .md files whole, and .jsonl lines of any kind."""
    root = Path(data_dir)
    if not root.is_dir():
        raise DataError(f"data directory {root} does not exist")
    corpus = Corpus(records=[], files=0)
    for path in sorted(root.rglob("*")):
        if not path.is_file() or (path.suffix not in TEXT_SUFFIXES and path.suffix != ".jsonl"):
            continue
        if path.stat().st_size > MAX_FILE_BYTES:
            corpus.skip("unknown", str(path), f"larger than {MAX_FILE_BYTES >> 20} MiB")
            continue
        corpus.files += 1
        try:
            content = path.read_text(encoding="utf-8", errors="replace")
        except OSError as e:
            corpus.skip("unknown", str(path), f"unreadable ({e.strerror or e})")
            continue
        if path.suffix in TEXT_SUFFIXES:
            if content.strip():
                corpus.records.append(Record("text", text=content, source=str(path)))
            continue
        for lineno, line in enumerate(content.split("\n"), 1):  # JSON Lines end at "\n" only (a "\r" may sit in a string)
            if line.strip():
                _parse_line(corpus, line, f"{path}:{lineno}")
    if not corpus.records:
        raise DataError(
            f"no usable records in {root}: expected .txt or .md files, or .jsonl lines with 'text', 'messages' "
            f"or 'prompt' and 'completion'" + (f" ({sum(corpus.skipped.values())} skipped)" if corpus.skipped else "")
        )
    return corpus


def read_texts(data_dir: str | Path) -> list[str]:
    """The plain-text documents under ``data_dir`` (the ``text`` records), in file order."""
    texts = [r.text for r in read_corpus(data_dir).records if r.kind == "text"]
    if not texts:
        raise DataError(f"no text in {data_dir}: expected .txt, .md or .jsonl files (with a 'text' field)")
    return texts


def _parse_line(corpus: Corpus, line: str, where: str) -> None:
    try:
        obj: Any = json.loads(line)
    except (json.JSONDecodeError, RecursionError):
        corpus.skip("unknown", where, "not JSON")
        return
    if not isinstance(obj, dict):
        corpus.skip("unknown", where, f"a JSON {type(obj).__name__}, not an object")
        return
    if "messages" in obj:
        why = _chat_problem(obj["messages"])
        if why:
            corpus.skip("chat", where, why)
        else:
            corpus.records.append(Record("chat", source=where, messages=tuple((m["role"], m["content"]) for m in obj["messages"])))
    elif "prompt" in obj or "completion" in obj:
        bad = [k for k in ("prompt", "completion") if not isinstance(obj.get(k), str)]
        if bad:
            corpus.skip("completion", where, f"'{bad[0]}' is missing or not a string")
        elif not obj["completion"].strip():
            corpus.skip("completion", where, "the completion is empty")
        else:
            corpus.records.append(Record("completion", source=where, prompt=obj["prompt"], completion=obj["completion"]))
    elif "text" in obj:
        if not isinstance(obj["text"], str):
            corpus.skip("text", where, "'text' is not a string")
        elif obj["text"].strip():
            corpus.records.append(Record("text", text=obj["text"], source=where))
    else:
        corpus.skip("unknown", where, "no 'text', 'messages' or 'prompt'/'completion' field")


def _chat_problem(messages: Any) -> str:
    """Why ``messages`` is not a usable chat, or ``""``."""
    if not isinstance(messages, list) or not messages:
        return "'messages' is not a non-empty list"
    if len(messages) > MAX_MESSAGES:
        return f"{len(messages)} messages, more than {MAX_MESSAGES}"
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            return f"message {i} is not an object with a string 'content'"
        if m.get("role") not in ROLES:
            return f"message {i} has role {str(m.get('role'))[:20]!r}, not one of {', '.join(ROLES)}"
    if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
        return "no assistant message with content: nothing to learn"
    return ""


# -- tokenizing ------------------------------------------------------------------------


class _Unrenderable(Exception):
    """A chat that the tokenizer's template cannot render as prefixes of itself."""


def _segments(record: Record, tokenizer: Any) -> list[tuple[str, bool]]:
    """``record`` as consecutive pieces of text, each marked whether the loss predicts it."""
    if record.kind == "text":
        return [(record.text, True)]
    if record.kind == "completion":
        return [(record.prompt, False), (record.completion, True)]
    msgs = [{"role": r, "content": c} for r, c in record.messages]

    def render(upto: int, prompt: bool) -> str:
        return str(tokenizer.apply_chat_template(msgs[:upto], tokenize=False, add_generation_prompt=prompt))

    full = render(len(msgs), False)
    out: list[tuple[str, bool]] = []
    done = 0
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        # The assistant's turn is what its message adds after the generation prompt,
        # closing tokens included (the model learns to stop).
        before, upto = render(i, True), render(i + 1, False)
        if len(before) < done or not upto.startswith(before) or not full.startswith(upto):
            raise _Unrenderable(f"the template does not render the first {i + 1} messages as a prefix of the whole chat")
        out += [(full[done : len(before)], False), (full[len(before) : len(upto)], True)]
        done = len(upto)
    out.append((full[done:], False))
    return [(text, target) for text, target in out if text]


def _chat_template_problem(tokenizer: Any) -> str:
    if getattr(tokenizer, "chat_template", None) is None or not hasattr(tokenizer, "apply_chat_template"):
        return "the model's tokenizer has no chat template"
    return ""


def build_blocks(records: list[str] | list[Record] | Corpus, tokenizer: Any, seq_len: int, heldout_fraction: float, seed: int) -> LocalData:
    """Tokenize each kind of record, concatenate with EOS separators and cut into blocks;
    hold out a fixed fraction of each kind. A plain string is a ``text`` record."""
    corpus = (
        records
        if isinstance(records, Corpus)
        else Corpus(records=[r if isinstance(r, Record) else Record("text", text=r) for r in records], files=len(records))
    )
    eos = tokenizer.eos_token_id
    block = seq_len + 1
    no_template = _chat_template_problem(tokenizer) if corpus.count("chat") else ""
    train, held, stats = [], [], {}
    for kind in KINDS:
        ids: list[int] = []
        used = 0
        for rec in (r for r in corpus.records if r.kind == kind):
            if kind == "chat" and no_template:
                corpus.skip(kind, rec.source or "a chat record", no_template)
                continue
            try:
                pieces = _segments(rec, tokenizer)
            except (_Unrenderable, ValueError, TypeError, KeyError) as e:  # a template may refuse a chat (role order)
                corpus.skip(kind, rec.source or f"a {kind} record", f"cannot render it: {str(e)[:200]}")
                continue
            for text, target in pieces:
                got = tokenizer(text, add_special_tokens=False)["input_ids"]
                ids.extend(got if target else [-t - 1 for t in got])
            if eos is not None and kind != "chat":  # a chat template closes every turn itself
                ids.append(eos)
            used += 1
        stream = np.asarray(ids, dtype=np.int64)
        n_blocks = len(stream) // block
        if used and n_blocks < 2:
            log.warning("%d %s records hold %d tokens, fewer than two blocks of %d: not used", used, kind, len(stream), block)
        if not used and not corpus.skipped.get(kind):
            continue
        kind_train = kind_held = np.zeros((0, block), dtype=np.int64)
        if n_blocks >= 2:
            blocks = stream[: n_blocks * block].reshape(n_blocks, block)
            kind_train, kind_held = _split(blocks, heldout_fraction, seed)
            train.append(kind_train)
            held.append(kind_held)
        targets = int(np.count_nonzero(stream >= 0))
        stats[kind] = KindStats(used, corpus.skipped.get(kind, 0), len(stream), targets, len(kind_train), len(kind_held))
    if not train:
        total = sum(s.tokens for s in stats.values())
        raise DataError(f"local data has {total} tokens; at least {2 * block} of one kind of record are needed for seq_len {seq_len}")
    return LocalData(train=np.concatenate(train), heldout=np.concatenate(held), num_files=corpus.files, stats=stats)


def describe(data: LocalData) -> str:
    """One line per kind of record: records (and skipped ones), tokens, train and held-out blocks."""
    parts = []
    for kind, st in data.stats.items():
        skipped = f" ({st.skipped} skipped)" if st.skipped else ""
        targets = f", {st.target_tokens:,} of them targets" if st.target_tokens != st.tokens else ""
        blocks = f"{st.train_blocks} train / {st.heldout_blocks} held-out blocks"
        parts.append(f"{kind}: {st.records:,} records{skipped}, {st.tokens:,} tokens{targets}, {blocks}")
    return "; ".join(parts)


def _split(blocks: np.ndarray, heldout_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    # The split depends only on block content and the seed, so it is stable across restarts.
    n = len(blocks)
    keys = np.array([int.from_bytes(hashlib.sha256(seed.to_bytes(8, "little") + b.tobytes()).digest()[:8], "little") for b in blocks])
    order = np.argsort(keys)
    n_held = min(max(1, round(n * heldout_fraction)), n - 1)
    return blocks[np.sort(order[n_held:])], blocks[np.sort(order[:n_held])]
