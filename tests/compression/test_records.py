"""Typed config records: every error names the key and the bad value."""

from dataclasses import dataclass, field
from typing import Literal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from compression.records import RecordError, env_overrides, from_mapping


@dataclass(frozen=True)
class Inner:
    port: int = 1883
    mode: Literal["a", "b"] = "a"


@dataclass(frozen=True)
class Outer:
    name: str
    rate: float = 0.5
    enabled: bool = True
    tags: tuple[str, ...] = ()
    inner: Inner = field(default_factory=Inner)
    opt: int | None = None


def test_nested_tables_and_defaults() -> None:
    cfg = from_mapping(Outer, {"name": "x", "inner": {"port": 9}, "tags": ["a", "b"]}, "cfg.toml")
    assert cfg == Outer(name="x", inner=Inner(port=9), tags=("a", "b"))


@pytest.mark.parametrize(
    "data, message",
    [
        ({"name": "x", "inner": {"port": "high"}}, "cfg.toml.inner.port: expected an integer, got 'high'"),
        ({"name": "x", "inner": {"mode": "c"}}, "cfg.toml.inner.mode: 'c' is not one of"),
        ({"name": "x", "colour": 1}, "unknown key\\(s\\) colour"),
        ({"name": "x", "enabled": 3}, "cfg.toml.enabled: expected true or false"),
        ({}, "name"),
    ],
)
def test_errors_name_the_key(data: dict, message: str) -> None:
    with pytest.raises(RecordError, match=message):
        from_mapping(Outer, data, "cfg.toml")


def test_environment_overrides_are_typed_by_the_field() -> None:
    data = env_overrides({"name": "x"}, "APP", {"APP__INNER__PORT": "2000", "APP__RATE": "0.25", "APP__ENABLED": "false", "OTHER": "1"})
    cfg = from_mapping(Outer, data, "env")
    assert (cfg.inner.port, cfg.rate, cfg.enabled) == (2000, 0.25, False)


@given(
    st.dictionaries(
        st.sampled_from(["name", "rate", "enabled", "tags", "inner", "opt", "zzz"]),
        st.none() | st.integers() | st.floats() | st.text(max_size=5) | st.lists(st.integers(), max_size=3),
    )
)
def test_parser_raises_record_error_only(data: dict) -> None:
    try:
        from_mapping(Outer, data, "cfg")
    except RecordError:
        pass
