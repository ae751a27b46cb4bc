"""Matplotlib figures without a display or a global backend switch, for the report and the explain stage."""

from __future__ import annotations


def new_figure(width: float = 5.0, height: float = 4.0):
    """A matplotlib figure on the non-interactive Agg canvas (no display needed, no global backend switch)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def panels(n: int, size: float = 3.5):
    """A figure of `n` square panels side by side; returns (figure, list of axes)."""
    fig = new_figure(size * n, size)
    return fig, [fig.add_subplot(1, n, i + 1) for i in range(n)]
