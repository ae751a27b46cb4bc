"""Number formatting shared by the report's sections."""

from __future__ import annotations

import numpy as np


def format_ci(value: float, low: float, high: float, digits: int = 3) -> str:
    """"value [low, high]" for tables; just the value when the interval is missing, "n/a" when the value is.

    Example:
        >>> format_ci(0.81234, 0.75, 0.866)
        '0.812 [0.750, 0.866]'
    """
    def fmt(v: float) -> str:
        return f"{v:.{digits}f}"

    if value is None or not np.isfinite(value):
        return "n/a"
    if low is None or high is None or not (np.isfinite(low) and np.isfinite(high)):
        return fmt(value)
    return f"{fmt(value)} [{fmt(low)}, {fmt(high)}]"


def format_p(p: float) -> str:
    """A p-value for tables: "<0.001" below a thousandth, "n/a" when missing.

    Example:
        >>> format_p(0.0004), format_p(0.0312), format_p(float("nan"))
        ('<0.001', '0.031', 'n/a')
    """
    return "n/a" if p is None or not np.isfinite(p) else ("<0.001" if p < 0.001 else f"{p:.3f}")
