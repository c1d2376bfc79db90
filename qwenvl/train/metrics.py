"""The metrics JSONL (one line per optimizer step) and the PNG loss curve drawn from it."""
from __future__ import annotations

import json
import os


class MetricsLog:
    """Append-only JSON lines on rank 0; on resume, lines past the checkpoint are dropped (they will be redone)."""

    def __init__(self, path: str, enabled: bool = True):
        self.path = path
        self.enabled = enabled

    def rewind(self, stage: int, step: int) -> None:
        """Keep the lines of earlier stages and of this stage up to `step` (steps are 1-based in the log)."""
        if not self.enabled or not os.path.isfile(self.path):
            return
        kept = [r for r in read(self.path) if r["stage"] < stage or (r["stage"] == stage and r["step"] <= step)]
        tmp = self.path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            for r in kept:
                f.write(json.dumps(r) + "\n")
        os.replace(tmp, self.path)

    def write(self, row: dict) -> None:
        if not self.enabled:
            return
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")


def read(path: str) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                raise ValueError(f"{path}, line {n}: not JSON; the metrics log is damaged (remove that line)") from None
    return rows


def summarize(rows: list[dict]) -> dict:
    """Per stage: steps, loss at the start and the end, tokens, time, and a line that says what was averaged.

    The start and end losses are means over the first and last k steps, k = min(10, steps // 2), so the two windows
    never overlap: a 3-step run compares its first step with its last, not a 3-step mean with itself.
    """
    out = {}
    for stage in sorted({r["stage"] for r in rows}):
        rs = [r for r in rows if r["stage"] == stage]
        k = max(1, min(10, len(rs) // 2))
        start = sum(r["loss"] for r in rs[:k]) / k
        end = sum(r["loss"] for r in rs[-k:]) / k
        tokens, seconds = sum(r["tokens"] for r in rs), sum(r["step_seconds"] for r in rs)
        if len(rs) == 1:
            loss = f"loss {start:.3f} (a single step)"
        elif k == 1:
            loss = f"loss {start:.3f} -> {end:.3f} (first step -> last step)"
        else:
            loss = f"loss {start:.3f} -> {end:.3f} (means of the first and last {k} steps)"
        out[stage] = {"steps": len(rs), "loss_start": start, "loss_end": end, "window": k, "tokens": tokens,
                      "seconds": seconds,
                      "line": f"{len(rs)} steps, {loss}, {tokens:,} tokens, {seconds:.0f} s"}
    return out


def plot_loss(metrics_path: str, png_path: str) -> None:
    """Loss per optimizer step, one colour per stage, with a moving average over the raw points."""
    import matplotlib

    matplotlib.use("Agg")  # no display: files only
    import matplotlib.pyplot as plt

    rows = read(metrics_path)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    offset = 0
    for stage in sorted({r["stage"] for r in rows}):
        rs = [r for r in rows if r["stage"] == stage]
        x = [offset + r["step"] for r in rs]
        y = [r["loss"] for r in rs]
        line, = ax.plot(x, y, alpha=0.3, linewidth=0.8)
        w = max(1, len(y) // 30)
        smooth = [sum(y[max(0, i - w + 1):i + 1]) / len(y[max(0, i - w + 1):i + 1]) for i in range(len(y))]
        ax.plot(x, smooth, color=line.get_color(), label=f"stage {stage}")
        offset = x[-1] if x else offset
    ax.set_xlabel("optimizer step (stages in sequence)")
    ax.set_ylabel("loss (mean over target tokens)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
