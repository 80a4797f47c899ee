"""The Mosquitto ACL of one fleet, rendered from its name (``fedge-coordinator acl``).

Every line names the fleet, so a device enrolled in one fleet can publish into no other
fleet's topics, even under its own id. ``%u`` is the connecting user, which is the device
id (a password login, or ``use_identity_as_username`` with the certificate's CN); with
``use_username_as_clientid`` it is also the MQTT client id, so no device can take over
another's session, or the coordinator's. Several fleets on one broker: one listener each,
with ``per_listener_settings true`` and its own ``acl_file``. ``sites`` adds the root broker's
lines for each site's bridge user, ``bridge-<site>``.
"""

from __future__ import annotations

from compression.protocol import check_id

COORDINATOR_USER = "coordinator"
OPERATOR_USER = "operator"


def render_acl(fleet: str, sites: tuple[str, ...] = ()) -> str:
    f = check_id(fleet, "fleet")
    return _devices(f) + "".join(_bridge(f, check_id(s, "site id")) for s in sites)


def _devices(f: str) -> str:
    return f"""\
# fedge ACL for fleet {f!r}, rendered by `fedge-coordinator acl --fleet {f}`.
# No per-device lines: %u is the connecting user, which is the device id (password login,
# or use_identity_as_username with the certificate's CN). Mosquitto rereads this file on
# SIGHUP (systemctl reload mosquitto).

# The coordinator: everything of this fleet.
user {COORDINATOR_USER}
topic readwrite fl/{f}/#

# Operators running `fedge-coordinator watch` / `cmd` from another machine.
user {OPERATOR_USER}
topic read fl/{f}/#
topic write fl/{f}/devices/+/cmd

# Devices: publish only under their own id in this fleet; read the global model, the
# coordinator's status, their own commands, acks and cohort invitations. A publish
# elsewhere gets PUBACK reason code 135 (MQTT v5).
pattern write fl/{f}/devices/%u/update
pattern write fl/{f}/devices/%u/status
pattern read fl/{f}/devices/%u/cmd
pattern read fl/{f}/devices/%u/ack
pattern read fl/{f}/global/#
pattern read fl/{f}/coordinator/status
pattern read fl/{f}/cohorts/+/invite/%u
pattern read fl/{f}/cohorts/+/secagg/%u
pattern write fl/{f}/devices/%u/secagg
"""


def _bridge(f: str, s: str) -> str:
    """The root broker's lines for site ``s``'s bridge (``devices/mosquitto/bridge-site.conf``): only its own topics."""
    return f"""
# Site {s!r}: its broker's bridge, user bridge-{s} (docs/sites.md). Up: its partials, its
# aggregator's status and the bridge's state. Down: its acks, the global model, the root's status.
user bridge-{s}
topic write fl/{f}/sites/{s}/partial
topic write fl/{f}/sites/{s}/status
topic write fl/{f}/sites/{s}/bridge
topic read fl/{f}/sites/{s}/ack
topic read fl/{f}/global/#
topic read fl/{f}/coordinator/status
"""
