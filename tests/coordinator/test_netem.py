"""Network impairment: the tc arguments, the validation, and a real namespace where this machine allows one."""

import subprocess

import pytest

from coordinator.errors import ConfigError
from fedge_lab.netem import ImpairedLink, Impairment, netns_supported


def test_netem_arguments() -> None:
    imp = Impairment(delay_ms=50, jitter_ms=10, loss_pct=1.5, rate_kbit=2000)
    assert imp.netem_args() == ["netem", "delay", "50ms", "10ms", "loss", "1.5%", "rate", "2000kbit"]
    assert imp.active and imp.needs_netem
    rate_only = Impairment(rate_kbit=800)
    assert rate_only.active and not rate_only.needs_netem
    assert rate_only.tbf_args()[:3] == ["tbf", "rate", "800kbit"]
    assert not Impairment().active


@pytest.mark.parametrize(
    "kwargs, message",
    [({"delay_ms": -1}, "must not be negative"), ({"loss_pct": 101}, "loss_pct"), ({"jitter_ms": 5}, "jitter_ms needs")],
)
def test_bad_impairments_are_refused(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Impairment(**kwargs)  # type: ignore[arg-type]


def _qdiscs(dev: str) -> str:
    return subprocess.run(["tc", "qdisc", "show", "dev", dev], capture_output=True, text=True).stdout


@pytest.mark.skipif(netns_supported() is not None, reason=str(netns_supported()))
def test_a_rate_limited_link_is_created_shaped_and_removed() -> None:
    link = ImpairedLink(Impairment(rate_kbit=4000), tag=424242).create()
    try:
        names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        assert link.netns in names
        assert "tbf" in _qdiscs(link.host_if) or "netem" in _qdiscs(link.host_if)
        inside = subprocess.run(link.wrap(["ip", "-o", "addr", "show", "dev", link.ns_if]), capture_output=True, text=True).stdout
        assert link.ns_ip in inside
    finally:
        link.destroy()
    assert link.netns not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert subprocess.run(["ip", "link", "show", link.host_if], capture_output=True).returncode != 0


@pytest.mark.skipif(netns_supported() is not None, reason=str(netns_supported()))
def test_delay_without_netem_in_the_kernel_is_an_error_not_a_silent_no_op() -> None:
    probe = ImpairedLink(Impairment(delay_ms=20), tag=424243)
    try:
        probe.create()
    except ConfigError as exc:
        assert "sch_netem" in str(exc)
        assert probe.netns not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    else:
        try:
            assert "netem" in _qdiscs(probe.host_if)
        finally:
            probe.destroy()
