"""The metrics log of a run (JSON lines) and its curves (loss, validation AP) as a PNG."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

class MetricsLog:
    """JSON lines: {"kind": "step", ...} every `log_interval` steps and {"kind": "epoch", ...} per epoch."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, **record: Any) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def records(self) -> list[dict]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text(encoding="utf-8").splitlines() if line.strip()]

    def truncate(self, step: int) -> None:
        """Drop the records written after optimizer step `step` (a resumed run writes them again)."""
        kept = [r for r in self.records() if r["step"] <= step]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")


def plot_curves(records: list[dict], path: Path) -> None:
    """Loss per logged step and per epoch, and validation AP / AP50 per epoch, to a PNG (no pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    steps = [r for r in records if r["kind"] == "step"]
    epochs = [r for r in records if r["kind"] == "epoch" and r["loss"] is not None]
    evaluated = [r for r in records if r["kind"] == "epoch" and "metrics" in r]
    figure = Figure(figsize=(11, 4))
    FigureCanvasAgg(figure)
    loss_ax, ap_ax = figure.subplots(1, 2)
    loss_ax.plot([r["step"] for r in steps], [r["loss"] for r in steps], lw=1, alpha=0.6, label="loss (steps)")
    loss_ax.plot([r["step"] for r in epochs], [r["loss"] for r in epochs], "o-", label="loss (epoch mean)")
    loss_ax.set(xlabel="optimizer step", ylabel="training loss", yscale="log", title="loss")
    for key in ("AP", "AP50"):
        ap_ax.plot([r["epoch"] + 1 for r in evaluated], [r["metrics"][key] for r in evaluated], "o-", label=key)
    ap_ax.set(xlabel="epoch", ylabel="COCO metric (EMA weights)", ylim=(0, 1), title="validation")
    for ax in (loss_ax, ap_ax):
        ax.grid(alpha=0.3)
        ax.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
