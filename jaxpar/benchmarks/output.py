"""What the benchmarks write: a JSON of the results, a Markdown table on stdout, and PNG plots (matplotlib,
headless and optional: no plots without it)."""
from __future__ import annotations

import json
import os


def publish(out_dir: str, json_name: str, result: dict, table: str, plot=None) -> None:
    """Write out_dir/json_name, print the table, then call plot(out_dir) -> paths and name what it wrote
    (process 0 only, when several processes run the benchmark)."""
    from jaxpar.tools.cli import is_main
    if not is_main():
        return
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, json_name), "w") as f:
        json.dump(result, f, indent=1)
    print(table)
    for path in plot(out_dir) if plot else []:
        print(f"wrote {path}")


def pyplot():
    """matplotlib.pyplot on the Agg backend, or None (with a note) when matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots (pip install matplotlib)")
        return None
    return plt


def save(plt, fig, out_dir: str, fname: str) -> str:
    """Lay out, write out_dir/fname at the benchmarks' resolution, close; -> the path."""
    fig.tight_layout()
    path = os.path.join(out_dir, fname)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def progress(done: int, total: int, label: str = "", width: int = 28) -> None:
    """A one-line progress bar on stderr (redrawn in place on a terminal, one line per update otherwise)."""
    import sys
    filled = int(width * done / max(total, 1))
    bar = "#" * filled + "-" * (width - filled)
    end = "\n" if done >= total or not sys.stderr.isatty() else ""
    sys.stderr.write(f"\r[{bar}] {done}/{total} {label:<40}{end}")
    sys.stderr.flush()


def write_csv(out_dir: str, name: str, rows: list) -> str:
    """rows (dicts with the same flat keys) -> out_dir/name (process 0 only); returns the path."""
    import csv
    from jaxpar.tools.cli import is_main
    path = os.path.join(out_dir, name)
    if not is_main():
        return path
    os.makedirs(out_dir, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else [])
        w.writeheader()
        w.writerows(rows)
    return path
