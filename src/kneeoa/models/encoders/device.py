"""Where and at which precision a frozen encoder runs: "auto" resolved against the hardware present."""

from __future__ import annotations

import torch

from kneeoa.errors import ConfigError


def resolve_device(device: str = "auto") -> str:
    """"auto" -> "cuda" when a GPU is visible, else "cpu"; anything else is passed to torch."""
    return ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device


def cpu_has_bf16() -> bool:
    """True when this CPU runs bf16 natively (AVX512-BF16 or AMX): bf16 autocast is then ~1.5x faster than fp32."""
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def resolve_precision(precision: str, device: str) -> str:
    """"auto" -> "bf16" on GPUs and CPUs with native bf16, else "fp32". bf16 features stay within cosine 0.9999."""
    if precision not in ("auto", "bf16", "fp32"):
        raise ConfigError(f"The 'precision' option of the foundation encoders must be one of 'auto', 'bf16', "
                          f"'fp32'. Got {precision!r}.")
    if precision != "auto":
        return precision
    if device.startswith("cuda"):
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_has_bf16() else "fp32"
