"""Tiny hand-drawn films for localiser tests: block-shaped knees on a dark background, in mm."""

from __future__ import annotations

import numpy as np
from scipy.ndimage import gaussian_filter


def _grid(shape_mm: tuple[float, float], spacing: float):
    h, w = int(shape_mm[0] / spacing), int(shape_mm[1] / spacing)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    return yy * spacing, xx * spacing


def draw_knee(y: np.ndarray, x: np.ndarray, img: np.ndarray, center_mm: tuple[float, float], gap_mm: float = 5.0):
    """Soft-tissue band, femur shaft widening to condyles, a joint gap, tibial plateau narrowing to the shaft."""
    cy, cx = center_mm
    dx, dy = np.abs(x - cx), y - cy
    img[dx < 60] = np.maximum(img[dx < 60], 0.3)
    half_width = np.where(dy < 0, 15 + 25 * np.clip(1 + dy / 45, 0, 1), 15 + 25 * np.clip(1 - dy / 45, 0, 1))
    bone = (dx < half_width) & (np.abs(dy) > gap_mm / 2)
    img[bone] = 0.8


def bilateral_film(spacing: float = 0.5, centers_mm=((200.0, 110.0), (205.0, 300.0)), shape_mm=(400.0, 420.0),
                   noise: float = 0.02, seed: int = 0) -> np.ndarray:
    y, x = _grid(shape_mm, spacing)
    img = np.full(y.shape, 0.05, np.float32)
    for c in centers_mm:
        draw_knee(y, x, img, c)
    img = gaussian_filter(img, 1.0 / spacing)
    return np.clip(img + np.random.default_rng(seed).normal(0, noise, img.shape), 0, 1).astype(np.float32)


def single_film(spacing: float = 0.5, center_mm=(150.0, 100.0), shape_mm=(300.0, 200.0)) -> np.ndarray:
    y, x = _grid(shape_mm, spacing)
    img = np.full(y.shape, 0.05, np.float32)
    draw_knee(y, x, img, center_mm)
    return gaussian_filter(img, 1.0 / spacing)
