"""The agent's durable state: every crash point of a round commit recovers to a consistent state."""

import json
import os
import random
from pathlib import Path

import numpy as np
import pytest

from compression import ErrorFeedback
from edge_agent.errors import StateError
from edge_agent.state import RESIDUAL, AgentState, _residual_bytes, atomic_write


def _fb(value: float) -> ErrorFeedback:
    return ErrorFeedback({"w": np.full((2, 3), value, np.float32)})


def _residual_value(state: AgentState) -> float:
    fb = state.load_feedback()
    return float(fb.residual["w"][0, 0]) if fb.residual else 0.0


def test_a_committed_round_survives_a_restart(tmp_path: Path) -> None:
    st = AgentState(tmp_path)
    seq = st.next_seq()
    st.commit_round(seq, b"envelope-1", _fb(1.5))
    again = AgentState(tmp_path)
    assert again.seq == 1 and again.residual_seq == 1
    assert _residual_value(again) == 1.5
    assert [p.read_bytes() for p in again.pending()] == [b"envelope-1"]
    assert not list((tmp_path / "outbox").glob("*.residual"))


def test_crash_before_the_update_is_written_undoes_the_round(tmp_path: Path) -> None:
    st = AgentState(tmp_path)
    st.commit_round(st.next_seq(), b"u1", _fb(1.0))
    seq = st.next_seq()
    # Step 1 done, step 2 not: the side residual exists without its update.
    atomic_write(tmp_path / "outbox" / f"{seq:012d}.residual", _residual_bytes(_fb(2.0), seq))
    again = AgentState(tmp_path)
    assert _residual_value(again) == 1.0  # the old residual: nothing of round 2 was sent
    assert [p.name for p in again.pending()] == ["000000000001.update"]
    assert again.seq == 2  # the reserved number is not reused
    assert again.next_seq() == 3


def test_crash_after_the_update_installs_its_residual(tmp_path: Path) -> None:
    st = AgentState(tmp_path)
    st.commit_round(st.next_seq(), b"u1", _fb(1.0))
    seq = st.next_seq()
    # Steps 1 and 2 done, step 3 not: the update will be sent, so its residual must be the current one.
    atomic_write(tmp_path / "outbox" / f"{seq:012d}.residual", _residual_bytes(_fb(2.0), seq))
    atomic_write(tmp_path / "outbox" / f"{seq:012d}.update", b"u2")
    again = AgentState(tmp_path)
    assert _residual_value(again) == 2.0 and again.residual_seq == 2
    assert [p.read_bytes() for p in again.pending()] == [b"u1", b"u2"]
    assert not list((tmp_path / "outbox").glob("*.residual"))


def test_sequence_numbers_never_go_back_even_if_state_json_is_old(tmp_path: Path) -> None:
    st = AgentState(tmp_path)
    for i in range(3):
        st.commit_round(st.next_seq(), f"u{i}".encode(), _fb(float(i)))
    (tmp_path / "state.json").write_text(json.dumps({"seq": 1}))
    assert AgentState(tmp_path).next_seq() == 4


def test_leftover_temp_files_are_removed(tmp_path: Path) -> None:
    AgentState(tmp_path)
    (tmp_path / f".{RESIDUAL}.abc.tmp").write_bytes(b"half")
    (tmp_path / "outbox" / ".000000000001.update.x.tmp").write_bytes(b"half")
    AgentState(tmp_path)
    assert not list(tmp_path.rglob("*.tmp"))


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda root: (root / "state.json").write_text("{"), "state.json is corrupt"),
        (lambda root: (root / RESIDUAL).write_bytes(b"\x00" * 5), "residual.safetensors is unreadable"),
    ],
)
def test_damaged_state_is_a_state_error_naming_the_file(tmp_path: Path, damage, message: str) -> None:  # type: ignore[no-untyped-def]
    damage(tmp_path)
    with pytest.raises(StateError, match=message):
        AgentState(tmp_path)


def test_refused_updates_go_to_the_dead_letter_folder(tmp_path: Path) -> None:
    st = AgentState(tmp_path)
    entry = st.commit_round(st.next_seq(), b"u1", _fb(1.0))
    st.dead_letter(entry, "reason code 135")
    assert not st.pending()
    assert (tmp_path / "outbox" / "rejected" / "000000000001.reason").read_text() == "reason code 135"


def test_random_crash_points_always_recover_consistently(tmp_path: Path) -> None:
    """Simulate kill -9 after any prefix of the commit's file operations, many times."""
    rng = random.Random(7)
    for trial in range(40):
        root = tmp_path / f"t{trial}"
        st = AgentState(root)
        st.commit_round(st.next_seq(), b"u1", _fb(1.0))
        seq = st.next_seq()
        side = root / "outbox" / f"{seq:012d}.residual"
        data = _residual_bytes(_fb(2.0), seq)
        steps = [
            (atomic_write, side, data),
            (atomic_write, root / "outbox" / f"{seq:012d}.update", b"u2"),
            (atomic_write, root / RESIDUAL, data),
            (lambda path, _: os.unlink(path), side, b""),
        ]
        done = rng.randint(0, len(steps))
        for fn, path, payload in steps[:done]:
            fn(path, payload)
        again = AgentState(root)
        sent = [p.read_bytes() for p in again.pending()]
        # Invariant: round 2's update is pending exactly when the residual is round 2's.
        assert (b"u2" in sent) == (_residual_value(again) == 2.0), (trial, done)
        assert again.next_seq() == 3


def test_a_read_only_view_never_touches_a_running_agents_files(tmp_path: Path) -> None:
    st = AgentState(tmp_path)
    st.commit_round(st.next_seq(), b"u1", _fb(1.0))
    seq = st.next_seq()
    # The agent is inside its next commit: a temp file and a side residual exist.
    half = tmp_path / "outbox" / f".{seq:012d}.update.abc.tmp"
    half.write_bytes(b"half")
    side = tmp_path / "outbox" / f"{seq:012d}.residual"
    atomic_write(side, _residual_bytes(_fb(2.0), seq))
    view = AgentState(tmp_path, readonly=True)
    assert view.seq == 2 and [p.name for p in view.pending()] == ["000000000001.update"]
    assert half.exists() and side.exists()
    with pytest.raises(StateError, match="read-only"):
        view.next_seq()
    with pytest.raises(StateError, match="read-only"):
        view.delivered(view.pending()[0])
    assert st.pending()
