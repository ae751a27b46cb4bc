"""Training the heat-map knee localiser (`kneeoa.localize.heatmap`) on CPU, reproducibly, in minutes.

Training films are drawn in memory, never written: films composed from real knee crops of the *train* split
(`kneeoa.synthetic.crop_films.compose_film`, with wider ranges than the test bed: crop side 100-145 mm, rotation +-12
degrees, more single, missing-leg and implant films), phantom bilateral films (`kneeoa.synthetic.phantom.films`, so the
phantom films the profile localiser handles stay handled), and a few chest and hand films as negatives. Each film
goes through the localiser's own input path (`prepare_input`) and is placed at a random offset, randomly mirrored,
on a fixed canvas; the target is a Gaussian (sigma 10 mm) at each true knee centre, none for missing legs,
implants and non-knee films. Loss: binary cross-entropy on the heat map with soft targets.

The refining network (`--stage refine`) learns from 96 mm windows of the same films at 1 mm (`refine_set`), drawn
around true knee centres with the offsets a coarse pass makes, and around missing legs, implants and points of
non-knee films with no target.

    kneeoa localize-train ../shared/data/kneeKL224 --films 3000 --epochs 10 [--stage refine]

writes the stage's packaged weights (`src/kneeoa/localize/weights/heatmap_knee.safetensors` or
`heatmap_refine.safetensors`, float16) and reports the held-out confidence quantiles used to set the thresholds.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

from kneeoa.errors import ConfigError, DataError
from kneeoa.localize.core import to_work
from kneeoa.localize.heatmap import (
    REFINE_MM,
    REFINE_WEIGHTS,
    STRIDE,
    WEIGHTS,
    WINDOW,
    WORK_MM,
    build_net,
    prepare_input,
    refine_window,
)
from kneeoa.synthetic.crop_films import VARIETY, WIDE_EXPOSURE, compose_film, load_crop, scan_crops
from kneeoa.synthetic.phantom import simulate_cohort
from kneeoa.synthetic.phantom.films import chest_film, hand_film, render_film

log = logging.getLogger(__name__)

#: Wider than the test bed, so the localiser does not hinge on the 130-140 mm crop-size assumption.
TRAIN_VARIETY = replace(VARIETY, crop_mm=(100.0, 145.0), rotation_deg=12.0, single_share=0.15, missing_share=0.1,
                        implant_share=0.1, gain=WIDE_EXPOSURE.gain, offset=WIDE_EXPOSURE.offset,
                        gamma=WIDE_EXPOSURE.gamma)
COMPOSE_MM = 1.25  # training films are composed at this spacing, then box-filtered to WORK_MM like real films
CANVAS = 160  # work pixels (480 mm): every training film fits
SIGMA_MM = 10.0
REFINE_COMPOSE_MM = 0.75  # refining windows come from films composed at this spacing, box-filtered to REFINE_MM
WINDOWS_PER_KNEE = 2  # refining windows drawn around each knee position of a film
REFINE_SIGMA_MM = 4.0
WINDOW_JITTER_MM = 25.0


def _target(shape: tuple[int, int], centres_work: list[tuple[float, float]], sigma: float) -> np.ndarray:
    """Gaussian heat (cells) at knee centres given in input pixels; `sigma` in cells."""
    rr, cc = np.mgrid[0:shape[0], 0:shape[1]].astype(np.float32)
    heat = np.zeros(shape, np.float32)
    for r, c in centres_work:
        rc, ccell = (r + 0.5) / STRIDE - 0.5, (c + 0.5) / STRIDE - 0.5
        heat = np.maximum(heat, np.exp(-((rr - rc) ** 2 + (cc - ccell) ** 2) / (2 * sigma**2)))
    return heat


def _film(kind: str, crops: pd.DataFrame, rng: np.random.Generator, specs: list, spacing_mm: float = COMPOSE_MM):
    """One training film at `spacing_mm`, its true knee centres and the centres of knee positions that hold no
    gradable knee (a missing leg, an implant; a random point of a chest or hand film), in film pixels."""
    if kind == "negative":
        make = chest_film if rng.random() < 0.5 else hand_film
        film = make(spacing_mm, rng)
        return film, [], [(rng.uniform(0, film.shape[0]), rng.uniform(0, film.shape[1]))]
    if kind == "phantom":
        i = int(rng.integers(len(specs) // 2)) * 2
        film, centres, _ = render_film(specs[i], specs[i + 1], spacing_mm=spacing_mm, rng=rng)
        return film, list(centres.values()), []
    v = TRAIN_VARIETY
    draw = rng.random()
    row = crops.iloc[int(rng.integers(len(crops)))]
    other = crops.iloc[int(rng.integers(len(crops)))]
    if draw < v.single_share:
        knees = {row["side"]: (load_crop(row["path"]), "knee")}
    else:
        knees = {"R": (load_crop(row["path"]), "knee"), "L": (load_crop(other["path"]), "knee")}
        odd = draw - v.single_share
        if odd < v.missing_share + v.implant_share:
            side = "R" if rng.random() < 0.5 else "L"
            knees[side] = (knees[side][0], "missing" if odd < v.missing_share else "implant")
    film, centres, _ = compose_film(knees, spacing_mm=spacing_mm, rng=rng, variety=v, single=len(knees) == 1)
    return (film, [centres[s] for s, (_, content) in knees.items() if content == "knee"],
            [centres[s] for s, (_, content) in knees.items() if content != "knee"])


def _films(crops: pd.DataFrame, n: int, *, seed: int, spacing_mm: float, phantom_share: float = 0.2,
           negative_share: float = 0.04):
    """n training films from `_film`, of each kind at its share, with the generator they were drawn with."""
    rng = np.random.default_rng(seed)
    specs = simulate_cohort(patients=max(4, n // 10), visits=1, seed=seed, low_quality_share=0.0)
    specs = sorted(specs, key=lambda s: (s.patient_id, s.side != "R"))
    for _ in range(n):
        u = rng.random()
        kind = "negative" if u < negative_share else "phantom" if u < negative_share + phantom_share else "real"
        yield (*_film(kind, crops, rng, specs, spacing_mm), rng)


def training_set(crops: pd.DataFrame, n: int, *, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """n training films (N, 1, CANVAS, CANVAS) float16 and heat targets (N, 1, CANVAS/4, CANVAS/4) float16."""
    x = np.zeros((n, 1, CANVAS, CANVAS), np.float16)
    y = np.zeros((n, 1, CANVAS // STRIDE, CANVAS // STRIDE), np.float16)
    for i, (film, centres, _, rng) in enumerate(_films(crops, n, seed=seed, spacing_mm=COMPOSE_MM)):
        work, sr, sc = prepare_input(film, (COMPOSE_MM, COMPOSE_MM))
        h, w = min(work.shape[0], CANVAS), min(work.shape[1], CANVAS)
        # Offsets in whole cells keep the target grid aligned with the input.
        r0 = int(rng.integers(0, (CANVAS - h) // STRIDE + 1)) * STRIDE
        c0 = int(rng.integers(0, (CANVAS - w) // STRIDE + 1)) * STRIDE
        x[i, 0, r0:r0 + h, c0:c0 + w] = work[:h, :w]
        works = [((r + 0.5) / sr - 0.5 + r0, (c + 0.5) / sc - 0.5 + c0) for r, c in centres]
        y[i, 0] = _target((CANVAS // STRIDE, CANVAS // STRIDE), works, SIGMA_MM / (WORK_MM * STRIDE))
        if rng.random() < 0.5:  # a mirrored film is still a pair of knees (sides come from position, not anatomy)
            x[i], y[i] = x[i, :, :, ::-1], y[i, :, :, ::-1]
    return x, y


def refine_set(crops: pd.DataFrame, n: int, *, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Refining windows (N, 1, WINDOW, WINDOW) float16 and targets (N, 1, WINDOW/4, WINDOW/4) float16.

    Films are composed at REFINE_COMPOSE_MM and box-filtered to REFINE_MM like real films; each knee position gives
    WINDOWS_PER_KNEE windows around points drawn near it, as a coarse pass would miss it (60 %: 5 mm sigma; 40 %: up
    to WINDOW_JITTER_MM either way). Windows around missing legs, implants and on non-knee films have no target, so the
    refined heat stays cold there.
    """
    xs, ys = [], []
    cells = WINDOW // STRIDE
    for film, knees, absent, rng in _films(crops, n, seed=seed, spacing_mm=REFINE_COMPOSE_MM):
        fine, sr, sc = to_work(film, (REFINE_COMPOSE_MM, REFINE_COMPOSE_MM), REFINE_MM)
        background = float(np.percentile(fine, 1))
        positions = [(k, True) for k in knees] + [(a, False) for a in absent]
        for (r, c), is_knee in positions * WINDOWS_PER_KNEE:
            r, c = (r + 0.5) / sr - 0.5, (c + 0.5) / sc - 0.5
            jitter = (rng.normal(0, 5.0, 2) if rng.random() < 0.6
                      else rng.uniform(-WINDOW_JITTER_MM, WINDOW_JITTER_MM, 2)) / REFINE_MM
            win, r0, c0 = refine_window(fine, (r + jitter[0], c + jitter[1]), background)
            target = _target((cells, cells), [(r - r0, c - c0)] if is_knee else [],
                             REFINE_SIGMA_MM / (REFINE_MM * STRIDE))
            if rng.random() < 0.5:
                win, target = win[:, ::-1], target[:, ::-1]
            xs.append(win)
            ys.append(target)
    return np.stack(xs)[:, None].astype(np.float16), np.stack(ys)[:, None].astype(np.float16)


#: The localiser's two networks: how each one's training set is drawn, and its packaged weights.
STAGES = {"coarse": (training_set, WEIGHTS), "refine": (refine_set, REFINE_WEIGHTS)}


def train_localizer(crops_dir: Path, *, stage: str = "coarse", out: Path | None = None, films: int = 3000,
                    epochs: int = 10, seed: int = 0, held_out: float = 0.1, threads: int = 2) -> dict:
    """Train one of the localiser's networks (STAGES) on films from the `train` split of `crops_dir`; save float16
    weights to `out` (default: the packaged file of that stage).

    Patients are split: `held_out` of them give films only for the reported confidence quantiles.

    Returns:
        {"seconds", "loss", "present_q01", "absent_q99"}: training time, last epoch's loss, the 1st percentile of the
        peak heat at true knees and the 99th of the peak heat on inputs without knees (held-out films).

    Raises:
        ConfigError: an unknown stage.
        DataError: too few train patients to hold some out.
    """
    import torch
    from safetensors.torch import save_file

    if stage not in STAGES:
        raise ConfigError(f"unknown localiser stage {stage!r}; one of {', '.join(STAGES)}")
    make_set, default_out = STAGES[stage]
    crops = scan_crops(crops_dir, "train")
    patients = np.array(sorted(crops["patient_id"].unique()))
    rng = np.random.default_rng(seed)
    held = set(rng.choice(patients, max(1, int(held_out * len(patients))), replace=False))
    fit, check = crops[~crops["patient_id"].isin(held)], crops[crops["patient_id"].isin(held)]
    if fit.empty or check.empty:
        raise DataError(f"{crops_dir}: too few train patients ({len(patients)}) to hold some out; need >= 2")
    t0 = time.perf_counter()
    x, y = make_set(fit, films, seed=seed)
    log.info("%d %s training samples from %d films in %.0f s", len(x), stage, films, time.perf_counter() - t0)
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    net = build_net()
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=1e-4)
    batch = 32
    steps = epochs * int(np.ceil(len(x) / batch))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    gen = torch.Generator().manual_seed(seed)
    loss_value = float("nan")
    for epoch in range(epochs):
        net.train()
        total = 0.0
        for idx in torch.randperm(len(x), generator=gen).split(batch):
            logits = net(xt[idx].float())
            target = yt[idx].float()
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, target, weight=1 + 20 * target)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        loss_value = total / len(x)
        log.info("epoch %d/%d loss %.4f (%.0f s)", epoch + 1, epochs, loss_value, time.perf_counter() - t0)
    net.eval()
    out = Path(out or default_out)
    out.parent.mkdir(parents=True, exist_ok=True)
    state = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in net.state_dict().items()}
    save_file(state, str(out))
    quantiles = _held_out_confidence(net, make_set(check, max(20, films // 10), seed=seed + 1))
    return {"seconds": time.perf_counter() - t0, "loss": loss_value, **quantiles}


def _held_out_confidence(net, held_out: tuple[np.ndarray, np.ndarray]) -> dict:
    """Peak heat at true knees (1st percentile) and on inputs without knees (99th), on held-out samples."""
    import torch

    x, y = held_out
    with torch.inference_mode():
        heat = torch.sigmoid(net(torch.from_numpy(x).float())).numpy()[:, 0]
    y = y[:, 0].astype(np.float32)
    present = heat[y > 0.9]
    absent = [h.max() for h, t in zip(heat, y, strict=True) if t.max() < 0.05]
    return {"present_q01": float(np.quantile(present, 0.01)) if len(present) else float("nan"),
            "absent_q99": float(np.quantile(absent, 0.99)) if absent else float("nan")}
