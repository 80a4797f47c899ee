"""A coordinator state directory holding version 0 and a trained-looking version 1, for export tests."""

import json
from pathlib import Path

import numpy as np

from coordinator.config import ModelSpecConfig
from coordinator.initial import initial_state
from coordinator.store import Store


def fleet_state(tmp_path: Path, spec_cfg: ModelSpecConfig, noise: float = 0.05) -> Path:
    """``tmp_path/coord``: version 0 of ``spec_cfg``, and version 1 = version 0 + N(0, noise) on every
    tensor (LoRA B starts at zero: the noise makes the adapter move the logits)."""
    spec, v0 = initial_state(spec_cfg)
    rng = np.random.default_rng(0)
    trained = {k: (v + rng.normal(0, noise, v.shape)).astype(np.float32) for k, v in v0.items()}
    store = Store(tmp_path / "coord", create=True)
    store.set_meta("spec", json.dumps(spec.to_dict()))
    store.commit_version(0, v0, None, keep=5)
    store.commit_version(1, trained, None, keep=5)
    store.close()
    return tmp_path / "coord"
