"""Record-level DP-SGD on the device: per-example clipping (a planted outlier cannot move the
step by more than the clip), noise, sampling without replacement, and the device's ε."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from edge_agent.config import TrainConfig
from edge_agent.data import LocalData
from edge_agent.model import get_trainable, set_trainable
from edge_agent.privacy import DPSGDConfig, dpsgd_epsilon
from edge_agent.train import clipped_gradient, lm_loss, train_round
from tests.edge_agent.test_train import lora_model  # noqa: F401 - the fixture

CLIP = 0.05


def _outlier(data: LocalData, seed: int = 0) -> np.ndarray:
    """A block unlike the corpus (uniform random tokens): its gradient is far larger than the others'."""
    vocab = int(data.train.max()) + 1
    return np.random.default_rng(seed).integers(0, vocab, size=data.train.shape[1]).astype(data.train.dtype)


def _flat(grads: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([g.reshape(-1) for g in grads])


def test_one_examples_gradient_is_clipped_so_a_planted_outlier_moves_the_sum_by_at_most_the_clip(lora_model) -> None:  # type: ignore[no-untyped-def]  # noqa: F811
    model, data = lora_model
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    normal = data.train[:3]
    planted = np.concatenate([normal, _outlier(data)[None, :]])
    with_outlier, norms, _ = clipped_gradient(model, params, planted, CLIP)
    without, _norms, _ = clipped_gradient(model, params, np.concatenate([normal, normal[:1]]), CLIP)
    assert norms[-1] > 5 * CLIP and max(norms[:3]) > CLIP  # every example is above the bound: all are clipped
    # Replacing the outlier by an ordinary example changes the sum by at most 2 * clip (each side is at most clip).
    assert float((_flat(with_outlier) - _flat(without)).norm()) <= 2 * CLIP * (1 + 1e-5)
    assert float(_flat(with_outlier).norm()) <= len(planted) * CLIP * (1 + 1e-5)
    # The unclipped gradient of the same batch is dominated by the outlier.
    model.zero_grad(set_to_none=True)
    lm_loss(model, planted).backward()
    raw = torch.cat([p.grad.reshape(-1) for p in params])
    model.zero_grad(set_to_none=True)
    assert float(raw.norm()) * len(planted) > 3 * float(_flat(with_outlier).norm())


def test_a_dpsgd_round_is_noised_and_its_batches_hold_distinct_examples(lora_model) -> None:  # type: ignore[no-untyped-def]  # noqa: F811
    model, data = lora_model
    start = get_trainable(model)
    cfg = TrainConfig(batch_size=4, seq_len=32, local_steps=2, lr=1e-2, threads=1)
    moved = []
    for _ in range(2):  # the same data and sampling seed: only the noise differs between the two runs
        set_trainable(model, start)
        result = train_round(model, data, cfg, np.random.default_rng(0), dp_sgd=DPSGDConfig(enabled=True, clip=CLIP, noise_multiplier=1.0))
        assert result.steps == 2 and np.isfinite(result.train_loss)
        moved.append(get_trainable(model))
    assert any(not np.allclose(moved[0][k], moved[1][k]) for k in start)  # noise from the OS, not the seed
    batches = data.batches(np.random.default_rng(1), 4, 20, replace=False)
    assert all(len({b.tobytes() for b in batch}) == len(batch) for batch in batches)


def test_the_device_epsilon_is_dp_accountings_for_its_sampling() -> None:
    import dp_accounting
    from dp_accounting.rdp import rdp_privacy_accountant

    acc = rdp_privacy_accountant.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    acc.compose(
        dp_accounting.SelfComposedDpEvent(dp_accounting.SampledWithoutReplacementDpEvent(500, 4, dp_accounting.GaussianDpEvent(1.1)), 300)
    )
    assert dpsgd_epsilon(300, 500, 4, 1.1, 1e-5) == pytest.approx(acc.get_epsilon(1e-5))
    assert dpsgd_epsilon(0, 500, 4, 1.1, 1e-5) == 0.0 and dpsgd_epsilon(10, 500, 4, 0.0, 1e-5) == float("inf")
    assert dpsgd_epsilon(600, 500, 4, 1.1, 1e-5) > dpsgd_epsilon(300, 500, 4, 1.1, 1e-5)


def test_the_agent_config_reads_privacy_sgd(tmp_path: Path) -> None:
    from edge_agent.config import parse_config

    cfg = parse_config(
        {
            "device_id": "d1",
            "data_dir": str(tmp_path),
            "state_dir": str(tmp_path),
            "lab_mode": True,
            "privacy": {"sgd": {"enabled": True, "clip": 0.5}},
        },
        "agent.toml",
    )
    assert cfg.privacy.sgd.enabled and cfg.privacy.sgd.clip == 0.5 and cfg.privacy.mechanism == "none"
