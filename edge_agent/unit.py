"""The systemd unit of ``fedge-agent``, with memory and CPU limits from a device profile.

``devices/systemd/fedge-agent.service`` is this template rendered for the
``raspberry-pi-4`` profile (a test keeps them identical). On a device::

    fedge-agent systemd-unit --profile raspberry-pi-5 > /etc/systemd/system/fedge-agent.service
"""

from __future__ import annotations

from edge_agent.config import TrainConfig, load_profile

HEADROOM_MB = 256
"""MemoryMax above the profile's budget: the first start builds the int8 cache in a child
process, which briefly needs about 1.2 GB with SmolLM2 (MemoryHigh throttles, MemoryMax kills)."""

TEMPLATE = """\
# fedge edge agent, rendered for the {profile} profile by `fedge-agent systemd-unit`.
# Install: see "Installing the agent on a device" in the README.
[Unit]
Description=fedge federated-learning agent ({profile})
Documentation=https://github.com/fedge/fedge#installing-the-agent-on-a-device
Wants=network-online.target
After=network-online.target
StartLimitIntervalSec=600
StartLimitBurst=5

[Service]
Type=notify
NotifyAccess=main
ExecStart={venv}/bin/fedge-agent run --config {config}
# SIGTERM finishes the current training step, keeps every update in the outbox, and exits 0.
KillSignal=SIGTERM
TimeoutStartSec=900
TimeoutStopSec=180
WatchdogSec=600
Restart=on-failure
RestartSec=15
# Exit code 2 is a configuration error: restarting cannot fix it.
RestartPreventExitStatus=2

DynamicUser=yes
StateDirectory=fedge-agent
StateDirectoryMode=0700
ConfigurationDirectory=fedge
Environment=FEDGE_AGENT__STATE_DIR=/var/lib/fedge-agent
Environment=HF_HUB_OFFLINE=1
ProtectSystem=strict
ProtectHome=read-only
PrivateTmp=yes
PrivateDevices=yes
NoNewPrivileges=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectControlGroups=yes
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6
LockPersonality=yes

MemoryHigh={memory_high}M
MemoryMax={memory_max}M
CPUWeight=20
Nice=10
IOSchedulingClass=idle

[Install]
WantedBy=multi-user.target
"""


def render_unit(profile: str, *, config: str = "/etc/fedge/agent.toml", venv: str = "/opt/fedge/venv") -> str:
    """The unit text for ``profile``: MemoryHigh is its memory budget, MemoryMax adds the headroom."""
    train = TrainConfig(**{k: v for k, v in load_profile(profile)["train"].items() if k in TrainConfig.__dataclass_fields__})
    name = profile.rsplit("/", 1)[-1].removesuffix(".toml")
    return TEMPLATE.format(
        profile=name,
        venv=venv.rstrip("/"),
        config=config,
        memory_high=train.memory_budget_mb,
        memory_max=train.memory_budget_mb + HEADROOM_MB,
    )
