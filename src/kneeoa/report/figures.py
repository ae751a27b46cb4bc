"""Figures as self-contained HTML: matplotlib figures and arrays become <img> tags with PNG data URIs."""

from __future__ import annotations

import base64
import html
import io

import numpy as np


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


def png_tag(png: bytes, alt: str = "", width: int | None = None) -> str:
    style = f' style="max-width:{width}px"' if width else ""
    return (f'<img alt="{html.escape(alt)}"{style} '
            f'src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}">')


def fig_to_img_tag(fig, alt: str = "", width: int | None = None) -> str:
    """Render a matplotlib figure to an embedded PNG <img> tag."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    return png_tag(buf.getvalue(), alt, width)


def array_to_img_tag(img: np.ndarray, alt: str = "", width: int | None = None) -> str:
    """A float image in [0, 1] (H, W) or (H, W, 3) as an embedded PNG <img> tag."""
    from PIL import Image

    arr = (np.clip(np.asarray(img, dtype=np.float64), 0, 1) * 255 + 0.5).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return png_tag(buf.getvalue(), alt, width)


def table_html(df, *, index: bool = False) -> str:
    """A pandas table as escaped HTML with the report's table class."""
    return df.to_html(index=index, classes="tbl", border=0, na_rep="", escape=True)
