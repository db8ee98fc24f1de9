"""Plot training runs from their metrics.jsonl: loss (train and validation), learning rate, tokens/s,
MFU, memory, and expert imbalance per MoE layer over steps, several runs overlaid.

    python -m dsmoe.plot runs/tiny-shakespeare                       # -> runs/tiny-shakespeare/plots/*.png
    python -m dsmoe.plot runs/a runs/b --out plots/a-vs-b             # two runs on the same axes

Writes overview.png (every panel) and one PNG per panel: loss, lr, tokens_per_s, mfu, memory,
expert_imbalance (the worst MoE layer) and expert_imbalance_per_layer (one axes per MoE layer: max / mean
tokens per expert, from the rows' tokens_per_expert). A panel no run has data for (MFU where no peak
was known) is left out.
Needs matplotlib (pip install 'dsmoe[plot]').
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

METRICS_FILE = "metrics.jsonl"
# panel name -> (title, y label, [(row key, line label suffix)]); a second key is drawn dashed with markers
PANELS = {
    "loss": ("Loss", "cross-entropy (nats)", [("loss", "train"), ("val_loss", "validation")]),
    "lr": ("Learning rate", "lr", [("lr", "")]),
    "tokens_per_s": ("Throughput", "tokens / s (all ranks)", [("tokens_per_s", "")]),
    "mfu": ("Model FLOPs utilisation", "MFU (%)", [("mfu", "")]),
    "memory": ("Memory", "GiB", [("mem_gb", "device peak"), ("rss_gb", "host RSS")]),
    "expert_imbalance": ("Expert imbalance (worst MoE layer)", "max / mean tokens per expert",
                         [("expert_imbalance", "")]),
}


class Run:
    """One run's metrics rows, each step once (the last row written for it wins)."""

    def __init__(self, run_dir: Path, label: str) -> None:
        self.dir, self.label = run_dir, label
        self.train, self.val = _read_rows(run_dir / METRICS_FILE)

    def series(self, key: str) -> tuple[list[int], list[float]]:
        rows = self.val if key.startswith("val_") else self.train
        points = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
        scale = 100.0 if key == "mfu" else 1.0
        return [s for s, _ in points], [v * scale for _, v in points]

    def layer_imbalance(self) -> list[tuple[list[int], list[float]]]:
        """Per MoE layer: (steps, max / mean tokens per expert)."""
        layers: list[tuple[list[int], list[float]]] = []
        for row in self.train:
            per_layer = _imbalance(row)
            for i, value in enumerate(per_layer):
                while len(layers) <= i:
                    layers.append(([], []))
                layers[i][0].append(row["step"])
                layers[i][1].append(value)
        return layers


def _imbalance(row: dict) -> list[float]:
    counts = row.get("tokens_per_expert")
    if counts:
        return [max(c) / max(sum(c) / len(c), 1e-9) for c in counts]
    return list(row.get("expert_imbalance_per_layer") or [])


def _read_rows(path: Path) -> tuple[list[dict], list[dict]]:
    """(train rows, validation rows) by step. Lines that are not rows (torn by a crash mid-write, not
    UTF-8, not JSON) are skipped, and the count is printed."""
    if not path.is_file():
        hint = " (is it a run directory? training writes metrics.jsonl there)" if path.parent.is_dir() else ""
        raise FileNotFoundError(f"{path} not found{hint}")
    train: dict[int, dict] = {}
    val: dict[int, dict] = {}
    skipped = []
    for number, line in enumerate(path.read_bytes().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line.decode("utf-8"))
            step = int(row["step"])
        except (UnicodeDecodeError, ValueError, KeyError, TypeError):
            skipped.append(number)
            continue
        target = val if "val_loss" in row and "loss" not in row else train
        target[step] = row
    if skipped:
        print(f"warning: {path}: skipped {len(skipped)} unreadable line(s), not metrics rows (torn or damaged): "
              f"line {', '.join(map(str, skipped[:10]))}" + (" ..." if len(skipped) > 10 else ""), file=sys.stderr)
    if not train and not val:
        raise ValueError(f"{path} holds no metrics rows yet: the run has not logged a step")
    return [train[s] for s in sorted(train)], [val[s] for s in sorted(val)]


def load_runs(run_dirs: list[str | Path]) -> list[Run]:
    """The runs, labelled by directory name (with the parent when two names are equal)."""
    paths = [Path(d) for d in run_dirs]
    names = [p.resolve().name for p in paths]
    return [Run(p, name if names.count(name) == 1 else f"{p.resolve().parent.name}/{name}")
            for p, name in zip(paths, names)]


def _draw_panel(ax, runs: list[Run], name: str, colors: dict) -> bool:
    title, ylabel, keys = PANELS[name]
    drawn = False
    for run in runs:
        for (key, suffix), style in zip(keys, ("-", "--o")):
            steps, values = run.series(key)
            if steps:
                label = f"{run.label} {suffix}".strip() if len(runs) > 1 or suffix else run.label
                ax.plot(steps, values, style, color=colors[run.label], label=label, markersize=3, linewidth=1.2)
                drawn = True
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    if drawn:
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    else:
        ax.text(0.5, 0.5, f"no {name} in these runs", ha="center", va="center", transform=ax.transAxes)
    return drawn


def plot_runs(run_dirs: list[str | Path], out_dir: str | Path) -> list[Path]:
    """Write the PNGs for `run_dirs` into `out_dir`; returns the files written.

    Raises:
        FileNotFoundError: a run directory without metrics.jsonl.
        ValueError: a metrics file with no rows.
        ImportError: matplotlib is not installed.
    """
    runs = load_runs(run_dirs)
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError("plots need matplotlib: pip install 'dsmoe[plot]' (or pip install matplotlib)") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    colors = {run.label: cycle[i % len(cycle)] for i, run in enumerate(runs)}
    written = []
    fig, axes = plt.subplots(2, 3, figsize=(16, 8.5))
    for ax, name in zip(axes.flat, PANELS):
        _draw_panel(ax, runs, name, colors)
    fig.suptitle(", ".join(run.label for run in runs))
    written.append(_save(fig, out / "overview.png"))
    for name in PANELS:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        if _draw_panel(ax, runs, name, colors):
            written.append(_save(fig, out / f"{name}.png"))
        else:
            plt.close(fig)
    layers = [run.layer_imbalance() for run in runs]
    n_layers = max(len(per_run) for per_run in layers)
    if n_layers:
        cols = min(n_layers, 4)
        fig, axes = plt.subplots(math.ceil(n_layers / cols), cols, figsize=(4 * cols, 3 * math.ceil(n_layers / cols)),
                                 squeeze=False, sharex=True)
        for i, ax in enumerate(axes.flat):
            if i >= n_layers:
                ax.axis("off")
                continue
            for run, per_run in zip(runs, layers):
                if i < len(per_run):
                    ax.plot(*per_run[i], color=colors[run.label], label=run.label, linewidth=1.2)
            ax.set_title(f"MoE layer {i}", fontsize=9)
            if i % cols == 0:
                ax.set_ylabel("max / mean tokens per expert", fontsize=8)
            ax.axhline(1.0, color="grey", linewidth=0.6, linestyle=":")
            ax.grid(alpha=0.3)
        axes.flat[0].legend(fontsize=7)
        fig.supxlabel("step")
        written.append(_save(fig, out / "expert_imbalance_per_layer.png"))
    return written


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dsmoe.plot", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories (each holds metrics.jsonl)")
    parser.add_argument("--out", default=None, help="folder for the PNGs (default: the first RUN_DIR/plots)")
    args = parser.parse_args(argv)
    out = Path(args.out) if args.out else Path(args.run_dirs[0]) / "plots"
    try:
        written = plot_runs(args.run_dirs, out)
    except (FileNotFoundError, ValueError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
