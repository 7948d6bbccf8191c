"""The training log: `log.csv`, one row per step, and its plot `loss.png`."""

import csv
import time
from pathlib import Path

from .checkpoints import drop_rows_after
from .previews import read_identity_log


class TrainingLog:
    """log.csv: one row per step, a column per logged term of the training module (its `LOG_TERMS`); a resumed run
    first drops the rows past its checkpoint."""

    def __init__(self, path: Path, start: int, main: bool, terms: tuple[str, ...]):
        self.path, self.main = path, main
        self.columns = ["step", "loss", *terms, "lr", "timestep", "batch", "seconds"]
        if main:
            drop_rows_after(path, start, self.columns)

    def write(self, step: int, losses, batch, lr: float, began: float) -> None:
        """The row of `step` (its last micro-batch's losses; the step began at `time.perf_counter()` `began`)."""
        values = {"step": step, "loss": losses.total.item(),
                  **{k: None if v is None else v.item() for k, v in losses.terms.items()},
                  "lr": lr, "timestep": losses.timestep.float().mean().item(), "batch": len(batch.latents),
                  "seconds": time.perf_counter() - began}
        if self.main:
            with self.path.open("a") as f:
                f.write(",".join("" if values.get(k) is None else f"{values[k]:.6g}" if isinstance(values[k], float)
                                 else str(values[k]) for k in self.columns) + "\n")


def _plot_terms(ax, rows: list[dict], keys: list[str]) -> None:
    """Per-step values of `keys`, with an exponential moving average of the noisy ones (random t, dropout)."""
    for key in keys:
        points = [(int(r["step"]), float(r[key])) for r in rows if r.get(key)]
        if not points:
            continue
        steps, values = zip(*points)
        line, = ax.plot(steps, values, alpha=0.35 if key != "lr" else 1.0, label=key)
        if key != "lr":
            ema, smooth = values[0], []
            for v in values:
                ema = 0.9 * ema + 0.1 * v
                smooth.append(ema)
            ax.plot(steps, smooth, color=line.get_color(), label=f"{key} (EMA)")


def plot_log(csv_path: Path, png_path: Path, panels: tuple[tuple[str, ...], ...],
             identity_csv: Path | None = None) -> None:
    """Loss terms in `panels` (with an exponential moving average), learning rate and, with previews, identity per
    subject."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(csv.DictReader(csv_path.open()))
    if not rows:
        return
    identity = read_identity_log(identity_csv) if identity_csv is not None else {}
    panels = [list(keys) for keys in panels] + [["lr"]] + ([["identity"]] if identity else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(4.3 * len(panels), 3.5))
    for ax, keys in zip(axes, panels):
        if keys == ["identity"]:
            for name, points in identity.items():
                ax.plot(*zip(*points), marker="o", label=name)
            ax.set_title("preview identity (Identity Check)", fontsize=9)
        else:
            _plot_terms(ax, rows, keys)
        ax.set_xlabel("step")
        if ax.get_legend_handles_labels()[0]:  # a term logged by none of the steps has no line
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png_path, dpi=80)
    plt.close(fig)
