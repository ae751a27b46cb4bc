"""Figures as self-contained HTML: matplotlib figures and arrays become <img> tags with PNG data URIs.

Figures themselves are made with `kneeoa.plotting`."""

from __future__ import annotations

import base64
import html
import io

import numpy as np


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
