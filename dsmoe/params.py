"""Print a config's resolved fields and parameter breakdown, building the model on the meta device.

    python -m dsmoe.params configs/models/smollm2-moe-576x30.yaml [--section.field=value ...]
    python -m dsmoe.params --all          # every preset in configs/models
"""
from __future__ import annotations

import sys
from pathlib import Path

from dsmoe.config import CONFIG_ROOT, ConfigError, dump_yaml, load_config
from dsmoe.model.transformer import CATEGORIES
from dsmoe.tools.model import breakdown, fmt_count

__all__ = ["breakdown", "breakdown_table", "fmt_count", "main"]


def breakdown_table(name: str, b: dict):
    from rich.table import Table

    table = Table(title=f"{name}: {fmt_count(b['total'])} total, {fmt_count(b['active'])} active per token")
    table.add_column("part")
    table.add_column("parameters", justify="right")
    table.add_column("share", justify="right")
    for cat in CATEGORIES:
        table.add_row(cat, f"{b[cat]:,}", f"{100 * b[cat] / b['total']:.1f}%")
    table.add_row("total", f"{b['total']:,}", "100%", style="bold")
    table.add_row("active / token", f"{b['active']:,}", f"{100 * b['active'] / b['total']:.1f}%")
    table.add_row("train FLOPs / token", f"{b['flops_per_token']:.3e}", "")
    return table


def main(argv: list[str] | None = None) -> int:
    from rich.console import Console

    argv = sys.argv[1:] if argv is None else argv
    console = Console()
    if not argv or argv[0] in ("-h", "--help"):
        console.print(__doc__)
        return 0
    try:
        if argv[0] == "--all":
            for path in sorted((CONFIG_ROOT / "models").glob("*.yaml")):
                console.print(breakdown_table(path.stem, breakdown(load_config(path, argv[1:]))))
            return 0
        cfg = load_config(argv[0], argv[1:])
    except ConfigError as e:
        console.print(f"[red]config error:[/red] {e}")
        return 2
    console.print(dump_yaml(cfg), markup=False, highlight=False)
    console.print(breakdown_table(Path(argv[0]).stem, breakdown(cfg)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
