"""Agent config: profiles, overrides, and errors that name the key."""

from pathlib import Path

import pytest

from edge_agent.config import load_config, parse_config
from edge_agent.errors import ConfigError


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "agent.toml"
    p.write_text(text)
    return p


def test_profile_values_apply_and_train_table_overrides_them(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        'device_id = "pi-1"\ndata_dir = "data"\nstate_dir = "state"\nlab_mode = true\n'
        'profile = "raspberry-pi-4"\n[train]\nlocal_steps = 9\n',
    )
    cfg = load_config(path, environ={})
    assert cfg.train.batch_size == 2 and cfg.train.threads == 4  # from the profile
    assert cfg.train.local_steps == 9  # from the file
    assert cfg.data_dir == str((tmp_path / "data").resolve())


def test_environment_overrides_win(tmp_path: Path) -> None:
    path = _write(tmp_path, 'device_id = "pi-1"\ndata_dir = "d"\nstate_dir = "s"\nlab_mode = true\n')
    cfg = load_config(path, environ={"FEDGE_AGENT__BROKER__PORT": "1999", "FEDGE_AGENT__CODEC__VALUES": "fp16"})
    assert cfg.broker.port == 1999 and cfg.codec.values == "fp16"


@pytest.mark.parametrize(
    "extra, message",
    [
        ('[broker]\nport = "high"\n', "broker.port: expected an integer"),
        ("[broker]\nport = 70000\n", "broker.port must be in 1..65535"),
        ("[codec]\ntopk_fraction = 2.0\n", "topk_fraction"),
        ('profile = "toaster"\n', "profile 'toaster' not found; known profiles: .*raspberry-pi-4"),
        ("[train]\nlr = 5.0\n", "train.lr"),
        ("colour = 1\n", "unknown key"),
    ],
)
def test_bad_values_are_named(tmp_path: Path, extra: str, message: str) -> None:
    text = 'device_id = "pi-1"\ndata_dir = "d"\nstate_dir = "s"\n'
    # Top-level keys must come before tables in TOML.
    text = extra + text if not extra.startswith("[") else text + extra
    with pytest.raises(ConfigError, match=message):
        load_config(_write(tmp_path, text), environ={})


def test_device_id_must_be_a_safe_topic_segment() -> None:
    with pytest.raises(ConfigError, match="device_id"):
        parse_config({"device_id": "a/b", "data_dir": "d", "state_dir": "s"}, "x", environ={})


def test_invalid_toml_is_reported_with_the_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_config(_write(tmp_path, "device_id = \n"), environ={})


def test_slowdown_is_a_lab_setting_bounded_below_by_one() -> None:
    from edge_agent.config import TrainConfig

    assert TrainConfig().slowdown == 1.0
    with pytest.raises(ConfigError, match="train.slowdown"):
        TrainConfig(slowdown=0.5)


def test_sample_weight_is_steps_or_the_dataset_size() -> None:
    from edge_agent.config import TrainConfig

    assert TrainConfig().sample_weight == "steps"
    assert TrainConfig(sample_weight="dataset").sample_weight == "dataset"
    with pytest.raises(ConfigError, match="train.sample_weight"):
        TrainConfig(sample_weight="tokens")  # type: ignore[arg-type]


def test_a_device_needs_the_fleet_key_unless_it_opts_into_lab_mode() -> None:
    base = {"device_id": "pi-1", "data_dir": "d", "state_dir": "s"}
    with pytest.raises(ConfigError, match="fleet_public_key"):
        parse_config(base, "x", environ={})
    with pytest.raises(ConfigError, match="64 lowercase hex"):
        parse_config({**base, "fleet_public_key": "zz"}, "x", environ={})
    assert parse_config({**base, "fleet_public_key": "ab" * 32}, "x", environ={}).fleet_public_key == "ab" * 32
    assert parse_config({**base, "lab_mode": True}, "x", environ={}).lab_mode
