"""matplotlib for the benchmarks' PNGs: headless, and optional (no plots without it)."""
from __future__ import annotations


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
    import os
    fig.tight_layout()
    path = os.path.join(out_dir, fname)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
