"""The demo's summary: a table, a JSON report and a PNG plot of held-out loss over versions."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table


def _mean(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    return sum(vals) / len(vals) if vals else None


def summarize(devices: list[dict[str, Any]], counts: dict[str, int], rejections: dict[str, int], extra: dict[str, Any]) -> dict[str, Any]:
    """The report object; its keys are the demo's ``--json`` contract."""
    bytes_up = int(sum(d.get("bytes_up") or 0 for d in devices))
    dense = int(sum(d.get("dense_bytes_up") or 0 for d in devices))
    return {
        "versions": counts.get("versions", 0) - 1,
        "updates_accepted": counts.get("accepted", 0),
        "updates_rejected": counts.get("rejected", 0),
        "rejections": rejections,
        "bytes_up": bytes_up,
        "dense_bytes_up": dense,
        "compression_ratio": dense / bytes_up if bytes_up else None,
        "eval_loss_before": _mean([d.get("eval_loss_before") for d in devices]),
        "eval_loss_after": _mean([d.get("eval_loss_after") for d in devices]),
        "loss_fell_on_every_device": bool(devices)
        and all(
            d.get("eval_loss_after") is not None and d.get("eval_loss_before") is not None and d["eval_loss_after"] < d["eval_loss_before"]
            for d in devices
        ),
        "devices": devices,
        **extra,
    }


def render(report: dict[str, Any], console: Console) -> None:
    table = Table(title=f"fedge demo: {report['model']}, {report['duration_s']:.0f}s, broker {report['broker']}")
    for col in ("device", "profile", "data", "rounds", "updates", "bytes up", "dense fp32", "eval before", "eval after", "change"):
        table.add_column(col, justify="left" if col in ("device", "profile", "data") else "right")
    for d in report["devices"]:
        before, after = d.get("eval_loss_before"), d.get("eval_loss_after")
        change = f"{(after - before) / before:+.1%}" if before and after is not None else "-"
        style = "green" if before and after is not None and after < before else "red"
        table.add_row(
            d["device"],
            d.get("profile") or "-",
            d.get("domain") or "-",
            str(d.get("rounds", 0)),
            str(d.get("updates_sent", 0)),
            f"{d.get('bytes_up', 0):,}",
            f"{d.get('dense_bytes_up', 0):,}",
            "-" if before is None else f"{before:.4f}",
            "-" if after is None else f"{after:.4f}",
            f"[{style}]{change}[/]",
        )
    console.print(table)
    ratio = report.get("compression_ratio")
    rej = ", ".join(f"{k}={v}" for k, v in sorted(report["rejections"].items())) or "none"
    console.print(
        f"global versions: {report['versions']}   updates accepted: {report['updates_accepted']}   "
        f"rejected: {report['updates_rejected']} ({rej})"
    )
    console.print(
        f"bytes up: {report['bytes_up']:,} vs dense fp32 {report['dense_bytes_up']:,}" + (f" ({ratio:.0f}x smaller)" if ratio else "")
    )
    b, a = report["eval_loss_before"], report["eval_loss_after"]
    if b is not None and a is not None:
        console.print(f"mean held-out loss: {b:.4f} -> {a:.4f} ({(a - b) / b:+.1%})")


def write_report(report: dict[str, Any], history: list[tuple[float, str, int, float]], run_dir: Path) -> tuple[Path, Path | None]:
    """Write ``report.json`` and ``eval_loss.png`` into ``run_dir``."""
    json_path = run_dir / "report.json"
    json_path.write_text(json.dumps({**report, "history": history}, indent=2))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return json_path, None
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for d in report["devices"]:
        pts = sorted((v, loss) for _, dev, v, loss in history if dev == d["device"])
        if d.get("eval_loss_before") is not None:
            pts = [(0, d["eval_loss_before"])] + [p for p in pts if p[0] > 0]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", markersize=3, label=f"{d['device']} ({d.get('domain')})")
    ax.set_xlabel("global version")
    ax.set_ylabel("held-out loss on the device's own text")
    ax.set_title(f"fedge demo: {report['model']}, FedAsync")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    png = run_dir / "eval_loss.png"
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return json_path, png
