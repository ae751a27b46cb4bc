"""The synthetic knee phantom: ground truth sampling, rendering, masks, determinism and the importer contract."""

from __future__ import annotations

import dataclasses
from collections import Counter

import numpy as np
import pytest

from kneeoa.config import Config
from kneeoa.errors import ConfigError
from kneeoa.formats.images import load_gray
from kneeoa.runfolder.manifest import import_target
from kneeoa.sources.manifest import validate_manifest
from kneeoa.sources.splits import assign_splits
from kneeoa.synthetic.phantom import (
    KneeGrades,
    import_phantom,
    progress,
    render_knee,
    render_spec,
    sample_anatomy,
    sample_grades,
    simulate_cohort,
)
from kneeoa.synthetic.phantom.grades import KL_MIX
from kneeoa.synthetic.phantom.quality import DEGRADATIONS
from kneeoa.synthetic.phantom.render import MASK_NAMES
from kneeoa.tasks import JSN_SITES, OSTEOPHYTE_SITES, RAW_GRADE_COLUMNS, SCLEROSIS_SITES, add_task_labels

CLEAN = {"noise_sd": 0.0, "blur_mm": 0.0}  # neutral pose and exposure, no noise: only the grades differ


def _cfg(patients: int = 2, visits: int = 1, size: int = 64, seed: int = 0, share: float = 0.25) -> Config:
    cfg = Config(seed=seed)
    cfg.data.patients, cfg.data.visits, cfg.data.image_size, cfg.data.low_quality_share = patients, visits, size, share
    return cfg


def _render(grades: KneeGrades, side: str = "R", out_px: int = 128, anatomy_seed: int = 1):
    anatomy = sample_anatomy(np.random.default_rng(anatomy_seed))
    return render_knee(grades, anatomy, side, out_px=out_px, fov_mm=140.0, rng=np.random.default_rng(0),
                       quality=CLEAN)


def _check_kl_consistent(g: KneeGrades) -> None:
    os_, jsn, sc = g.worst(OSTEOPHYTE_SITES), g.worst(JSN_SITES), g.worst(SCLEROSIS_SITES)
    if g.klg == 0:
        assert (os_, jsn, sc) == (0, 0, 0), g
    if g.klg == 1:
        assert os_ <= 1 and jsn <= 1 and sc == 0 and os_ + jsn >= 1, g
    if g.klg == 2:
        assert os_ >= 1 and jsn <= 1 and sc <= 1, g
    if g.klg >= 3:
        assert os_ >= 1 and jsn >= 1, g
    if g.klg == 4:
        assert os_ >= 2 and jsn >= 2 and sc >= 1, g


# --- ground truth -----------------------------------------------------------------------------------------------


def test_kl_mix_matches_target_and_binary_tasks_are_mixed():
    rng = np.random.default_rng(0)
    draws = [sample_grades(rng) for _ in range(8000)]
    counts = Counter(g.klg for g in draws)
    for klg, share in enumerate(KL_MIX):
        assert abs(counts[klg] / len(draws) - share) < 0.02
    for sites in (OSTEOPHYTE_SITES, JSN_SITES, SCLEROSIS_SITES):
        prevalence = np.mean([g.worst(sites) >= 1 for g in draws])
        assert 0.1 < prevalence < 0.9


@pytest.mark.parametrize("klg", range(5))
def test_grades_follow_kl_definitions(klg):
    rng = np.random.default_rng(klg)
    for _ in range(400):
        g = sample_grades(rng, klg)
        assert g.klg == klg
        _check_kl_consistent(g)
        _check_kl_consistent(progress(g, rng))


def test_disease_favours_the_primary_compartment():
    rng = np.random.default_rng(0)
    lateral = [sample_grades(rng, 4, primary="l") for _ in range(200)]
    assert all(g.jsn_l >= g.jsn_m for g in lateral)
    assert np.mean([g.jsn_l > g.jsn_m for g in lateral]) > 0.5


def test_progression_never_decreases_a_grade():
    specs = simulate_cohort(patients=60, visits=4, seed=1, low_quality_share=0.0)
    knees: dict[tuple[str, str], list] = {}
    for s in specs:
        knees.setdefault((s.patient_id, s.side), []).append(s)
    stepped = 0
    for visits in knees.values():
        assert [s.visit for s in visits] == [0, 1, 2, 3]
        assert len({id(s.anatomy) for s in visits}) == 1
        for before, after in zip(visits, visits[1:], strict=False):
            for name in ("klg", *RAW_GRADE_COLUMNS):
                assert getattr(after.grades, name) >= getattr(before.grades, name)
            assert after.grades.klg - before.grades.klg <= 1
            stepped += after.grades.klg > before.grades.klg
            _check_kl_consistent(after.grades)
    assert stepped > 0


def test_cohort_ids_anatomy_sharing_and_stable_prefix():
    specs = simulate_cohort(patients=3, visits=2, seed=5, low_quality_share=0.1)
    assert [s.image_id for s in specs[:4]] == ["P0001_R_V00", "P0001_R_V01", "P0001_L_V00", "P0001_L_V01"]
    assert {s.side for s in specs} == {"R", "L"} and {s.visit for s in specs} == {0, 1}
    assert specs[0].anatomy is specs[2].anatomy  # both knees share the patient's anatomy
    assert specs[0].anatomy != specs[4].anatomy
    more = simulate_cohort(patients=5, visits=2, seed=5, low_quality_share=0.1)
    assert more[: len(specs)] == specs  # adding patients leaves earlier ones unchanged
    longer = simulate_cohort(patients=3, visits=3, seed=5, low_quality_share=0.1)
    assert [s for s in longer if s.visit < 2] == specs  # adding visits too
    assert len({s.seed for s in more}) == len(more)


def test_low_quality_share():
    specs = simulate_cohort(patients=300, visits=1, seed=2, low_quality_share=0.25)
    assert abs(np.mean([s.low_quality for s in specs]) - 0.25) < 0.05
    assert not any(s.low_quality for s in simulate_cohort(patients=20, visits=1, seed=2, low_quality_share=0.0))
    assert all(s.low_quality for s in simulate_cohort(patients=20, visits=1, seed=2, low_quality_share=1.0))
    lq = next(s for s in specs if s.low_quality)
    assert render_spec(lq, out_px=64).quality["degradation"] in DEGRADATIONS


# --- rendering ------------------------------------------------------------------------------------------------------


def test_render_output_contract():
    r = _render(KneeGrades(0), out_px=96)
    assert r.image.shape == (96, 96) and r.image.dtype == np.float32
    assert 0.0 <= r.image.min() and r.image.max() <= 1.0
    assert set(r.masks) == set(MASK_NAMES)
    assert all(m.shape == (96, 96) and m.dtype == bool for m in r.masks.values())
    assert r.pixel_spacing_mm == pytest.approx(140.0 / 96)
    assert r.joint_center_px == pytest.approx((47.5, 47.5))


@pytest.mark.parametrize("site", RAW_GRADE_COLUMNS)
def test_masks_nonempty_exactly_when_feature_present(site):
    r0 = _render(KneeGrades(0), out_px=96)
    assert r0.masks["joint"].any()
    assert not any(r0.masks[name].any() for name in MASK_NAMES if name != "joint")
    r = _render(KneeGrades(3, **{site: 2}), out_px=96)
    feature = {"os": "osteophytes", "js": "jsn", "sc": "sclerosis"}[site[:2]]
    assert r.masks[site].any() and r.masks[feature].any()
    others = [n for n in RAW_GRADE_COLUMNS if n != site] + [f for f in ("osteophytes", "jsn", "sclerosis")
                                                            if f != feature]
    assert not any(r.masks[name].any() for name in others)


def _centroid(mask: np.ndarray) -> tuple[float, float]:
    rows, cols = np.nonzero(mask)
    return float(rows.mean()), float(cols.mean())


@pytest.mark.parametrize("side", ["R", "L"])
def test_masks_sit_on_the_anatomical_side(side):
    grades = KneeGrades(4, os_fm=2, os_fl=2, os_tm=2, os_tl=2, jsn_m=2, jsn_l=1, sc_tm=2, sc_fl=2)
    r = _render(grades, side=side)
    cr, cc = r.joint_center_px
    medial_sign = 1 if side == "R" else -1  # PA view: a right knee's medial side is on the image right
    for comp, sign in (("m", medial_sign), ("l", -medial_sign)):
        fem, tib = _centroid(r.masks[f"os_f{comp}"]), _centroid(r.masks[f"os_t{comp}"])
        assert sign * (fem[1] - cc) > 25 and sign * (tib[1] - cc) > 25  # at the joint margin, > 27 mm out
        assert fem[0] < tib[0] and abs(fem[0] - cr) < 15 and abs(tib[0] - cr) < 15  # femur above tibia, at the joint
        assert sign * (_centroid(r.masks[f"jsn_{comp}"])[1] - cc) > 5
    assert _centroid(r.masks["sc_tm"])[0] > cr > _centroid(r.masks["sc_fl"])[0]  # tibia below, femur above
    assert medial_sign * (_centroid(r.masks["sc_tm"])[1] - cc) > 5


def test_fibula_is_lateral():
    # Below the joint, the fibular head adds bone on the lateral side only: image left for R, right for L.
    for side, lateral_is_left in (("R", True), ("L", False)):
        img = _render(KneeGrades(0), side=side).image
        band = img[80:100]  # about 15-27 mm below the joint line at 128 px over 140 mm
        left, right = band[:, 20:40].mean(), band[:, 88:108].mean()
        assert (left > right) == lateral_is_left


def test_narrowing_osteophytes_and_sclerosis_are_visible():
    normal = _render(KneeGrades(0))
    gap = normal.masks["joint"] & (np.arange(128)[None, :] > normal.joint_center_px[1] + 8)  # medial half (R)
    narrowed = _render(KneeGrades(4, os_tm=2, os_fm=2, jsn_m=3, sc_tm=2, sc_fm=2))
    # The grade-0 joint space of the medial compartment is dark; with JSN 3 bone fills it.
    assert narrowed.image[gap].mean() > normal.image[gap].mean() + 0.15
    threshold = (normal.image[gap].mean() + normal.image[normal.masks["joint"] == 0].max()) / 2
    assert (narrowed.image[gap] < threshold).sum() < 0.5 * (normal.image[gap] < threshold).sum()
    spur = narrowed.masks["os_tm"] & ~(normal.image > 0.6)  # where the spur lies outside the normal bone
    assert spur.sum() > 10 and narrowed.image[spur].mean() > normal.image[spur].mean() + 0.2
    band = _render(KneeGrades(3, os_tm=1, jsn_m=1, sc_tm=3))
    plain = _render(KneeGrades(3, os_tm=1, jsn_m=1))
    assert band.image[band.masks["sc_tm"]].mean() > plain.image[band.masks["sc_tm"]].mean() + 0.05


def test_film_field_of_view_reaches_the_shafts():
    anatomy = sample_anatomy(np.random.default_rng(0))
    r = render_knee(KneeGrades(0), anatomy, "R", out_px=128, fov_mm=250.0, rng=np.random.default_rng(0),
                    quality=CLEAN, center_offset_mm=(10.0, -5.0))
    assert r.joint_center_px == pytest.approx((63.5 + 10 / r.pixel_spacing_mm, 63.5 - 5 / r.pixel_spacing_mm))
    soft_tissue = r.image[64, 2:8].mean()
    col = int(round(r.joint_center_px[1]))
    assert r.image[1, col - 3:col + 4].mean() > soft_tissue + 0.2  # femoral shaft at the top edge
    assert r.image[-2, col - 3:col + 4].mean() > soft_tissue + 0.2  # tibial shaft at the bottom edge


# --- importer and determinism ----------------------------------------------------------------------------------------


def test_import_phantom_rows_pass_the_manifest_contract(tmp_path):
    cfg = _cfg(patients=4, visits=2)
    result = import_phantom(None, import_target(tmp_path), cfg, show_progress=False)
    df = result.manifest
    assert len(df) == 4 * 2 * 2 and "split" not in df
    assert set(df["source"]) == {"phantom"} and df["pixel_spacing_mm"].eq(140.0 / 64).all()
    assert (df["low_quality"] == (df["degradation"] != "none")).all()
    for row in df.itertuples():
        assert load_gray(tmp_path / row.image_path).shape == (64, 64)
        with np.load(tmp_path / row.mask_path) as masks:
            assert set(masks.files) == set(MASK_NAMES)
            assert masks["osteophytes"].any() == (max(getattr(row, s) for s in OSTEOPHYTE_SITES) > 0)
    df = add_task_labels(df)
    df["split"] = assign_splits(df, seed=0)
    checked = validate_manifest(df, origin="phantom manifest")
    assert checked["klg"].dtype == "Int64" and set(checked["osteophytes"].dropna()) <= {0, 1}


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    def files(seed: int, name: str) -> dict[str, bytes]:
        out = tmp_path / name
        import_phantom(None, import_target(out), _cfg(seed=seed), show_progress=False)
        return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}

    first, again, other = files(0, "a"), files(0, "b"), files(1, "c")
    assert len(first) == 2 * 2 * 2 and first == again
    assert all(other[k] != first[k] for k in first if k.endswith(".png"))


def test_import_notes_an_unused_source(tmp_path):
    result = import_phantom(tmp_path / "ignored", import_target(tmp_path / "run"), _cfg(patients=1),
                            show_progress=False)
    assert any("not used" in note for note in result.notes)


# --- bad input --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"patients": 0}, "patients must be an integer >= 1"),
    ({"visits": 0}, "visits must be an integer >= 1"),
    ({"seed": -1}, "seed must be an integer >= 0"),
    ({"low_quality_share": 1.5}, "low_quality_share must be a number between 0 and 1"),
    ({"low_quality_share": -0.1}, "low_quality_share must be a number between 0 and 1"),
])
def test_simulate_cohort_rejects_bad_arguments(kwargs, match):
    args = {"patients": 2, "visits": 1, "seed": 0, "low_quality_share": 0.1, **kwargs}
    with pytest.raises(ConfigError, match=match):
        simulate_cohort(**args)


def test_import_phantom_rejects_bad_config(tmp_path):
    with pytest.raises(ConfigError, match=r"data.image_size must be an integer >= 64"):
        import_phantom(None, import_target(tmp_path), _cfg(size=16), show_progress=False)
    with pytest.raises(ConfigError, match="patients must be an integer >= 1"):
        import_phantom(None, import_target(tmp_path), _cfg(patients=0), show_progress=False)
    with pytest.raises(ConfigError, match="low_quality_share must be a number between 0 and 1"):
        import_phantom(None, import_target(tmp_path), _cfg(share=2.0), show_progress=False)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"out_px": 16}, "out_px must be an integer >= 64"),
    ({"fov_mm": 10.0}, "fov_mm must be between"),
    ({"side": "X"}, "side must be 'R' or 'L'"),
    ({"quality": {"exposure": 2}}, r"Unknown quality key\(s\) \['exposure'\]"),
    ({"quality": {"degradation": "fog"}}, "Unknown degradation 'fog'. Valid: noise"),
    ({"quality": {"severity": 3}}, "severity' must be between 0 and 1"),
])
def test_render_knee_rejects_bad_arguments(kwargs, match):
    args = {"grades": KneeGrades(0), "anatomy": sample_anatomy(np.random.default_rng(0)), "side": "R",
            "out_px": 64, "fov_mm": 140.0, "rng": np.random.default_rng(0), **kwargs}
    with pytest.raises(ConfigError, match=match):
        render_knee(**args)


def test_grades_reject_bad_values():
    with pytest.raises(ConfigError, match="klg must be an integer 0-4"):
        KneeGrades(5)
    with pytest.raises(ConfigError, match="os_tm must be an integer 0-3"):
        KneeGrades(2, os_tm=4)
    with pytest.raises(ConfigError, match="klg must be an integer 0-4 or None"):
        sample_grades(np.random.default_rng(0), 7)
    with pytest.raises(ConfigError, match="primary compartment must be 'm'"):
        sample_grades(np.random.default_rng(0), 2, primary="x")
    with pytest.raises(ConfigError, match="rng must be a numpy Generator"):
        sample_grades(0)
    assert dataclasses.replace(KneeGrades(2, os_tm=1), os_tm=2).as_dict()["os_tm"] == 2
