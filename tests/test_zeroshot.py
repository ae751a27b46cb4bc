"""Stage `zeroshot` (anatomy QC, KL grading by prompts) and the foundation report sections, end to end."""

from __future__ import annotations

import numpy as np
import pytest

from kneeoa.config import Config, ZeroShotCfg
from kneeoa.errors import ConfigError
from kneeoa.formats.images import load_gray
from kneeoa.models.encoders import zero_shot
from kneeoa.models.encoders.base import ClipEncoder
from kneeoa.models.encoders.foundation import create_encoder
from kneeoa.report.foundation_sections import embeddings_section, zeroshot_section
from kneeoa.runfolder.arms import read_arms
from kneeoa.runfolder.predictions import prediction_path, read_predictions
from kneeoa.runfolder.qc import read_zeroshot_qc, read_zeroshot_summary
from kneeoa.sources.manifest import read_manifest, write_manifest
from kneeoa.stages import zeroshot


def _cfg(standin_snapshots) -> Config:
    cfg = Config()
    cfg.foundation.weights = {k: str(v) for k, v in standin_snapshots.items()}
    cfg.foundation.precision, cfg.foundation.batch_size = "fp32", 8
    return cfg


def test_prompts_and_probabilities_are_pure_functions():
    assert zero_shot.prompts(["a", "b"], "this is a photo of {label}") == ["this is a photo of a",
                                                                          "this is a photo of b"]
    img = np.array([[3.0, 0.0], [1.0, 1.0]])
    txt = np.array([[1.0, 0.0], [0.0, 2.0]])
    p = zero_shot.zero_shot_probs(img, txt, 10.0)
    # row 0: cosines (1, 0) -> softmax(10, 0); row 1: cosines equal -> one half each
    np.testing.assert_allclose(p[0], np.exp([10, 0]) / np.exp([10, 0]).sum())
    np.testing.assert_allclose(p[1], [0.5, 0.5])
    with pytest.raises(ConfigError, match=r"zeroshot.template must contain '\{label\}'"):
        zero_shot.prompts(["a"], "a photo")


@pytest.mark.parametrize(("change", "message"), [
    ({"knee_label": "knee radiograph"}, "knee_label 'knee radiograph' is not in zeroshot.labels"),
    ({"klg_prompts": ["no OA", "severe OA"]}, r"one prompt per KL grade \(5, KL0 first\). Got 2"),
    ({"labels": ["knee X-ray"]}, "needs the knee label and at least one other"),
])
def test_bad_prompt_config(tiny_run, change, message):
    cfg = Config()
    cfg.zeroshot = ZeroShotCfg(**change)
    with pytest.raises(ConfigError, match=message):
        zeroshot.run(tiny_run, cfg)


def test_zeroshot_qc_and_klg(tiny_run, standin_snapshots):
    manifest = read_manifest(tiny_run)
    manifest.loc[manifest.index[:5], "low_quality"] = True
    write_manifest(manifest, tiny_run)
    manifest_bytes = (tiny_run / "manifest.parquet").read_bytes()
    cfg = _cfg(standin_snapshots)
    zeroshot.run(tiny_run, cfg)

    assert (tiny_run / "manifest.parquet").read_bytes() == manifest_bytes  # the QC has its own table
    qc_rows = read_zeroshot_qc(tiny_run)
    assert list(qc_rows["image_id"]) == list(manifest["image_id"])
    enc = create_encoder("biomedclip", standin_snapshots["biomedclip"], precision="fp32")
    images = np.stack([load_gray(tiny_run / p) for p in manifest["image_path"]])
    text = enc.encode_text([f"this is a photo of {label}" for label in cfg.zeroshot.labels])
    probs = zero_shot.zero_shot_probs(enc.encode_projected(images), text, enc.logit_scale)
    np.testing.assert_allclose(qc_rows["zs_knee_prob"], probs[:, 0], rtol=1e-4, atol=1e-6)
    assert (qc_rows["zs_is_knee"] == (probs.argmax(axis=1) == 0)).all()

    qc = read_zeroshot_summary(tiny_run)
    assert qc["arm"] == "biomedclip_zeroshot" and qc["encoder"] == "biomedclip"
    assert qc["overall"]["share"] == pytest.approx(qc_rows["zs_is_knee"].mean())
    low = manifest["low_quality"].to_numpy()
    assert qc["by_low_quality"]["true"]["n"] == 5
    assert qc["by_low_quality"]["true"]["share"] == pytest.approx(qc_rows.loc[low, "zs_is_knee"].mean())
    assert len(qc["failures"]) == min(12, int((~qc_rows["zs_is_knee"]).sum()))

    _, _, knee = read_predictions(prediction_path(tiny_run, "biomedclip_zeroshot", "knee_id"))
    assert (knee["y_true"] == 1).all()
    np.testing.assert_allclose(knee["prob_1"], qc_rows["zs_knee_prob"])
    _, _, klg = read_predictions(prediction_path(tiny_run, "biomedclip_zeroshot", "klg"))
    assert list(klg["y_true"]) == list(manifest["klg"]) and klg.filter(like="prob_").shape[1] == 5
    rec = read_arms(tiny_run)["biomedclip_zeroshot"]
    assert rec["status"] == "ran" and rec["details"]["tasks"] == ["knee_id", "klg"]

    section = zeroshot_section(tiny_run, cfg)
    assert f"{100 * qc['overall']['share']:.2f}%" in section and "low_quality = true" in section
    assert section.count("data:image/png;base64") == min(6, len(qc["failures"]))  # one thumbnail per listed miss


def test_a_miss_is_shown_with_its_image(tiny_run, standin_snapshots):
    """The knee label ranked last for every image: every image is a miss, and the section shows thumbnails."""
    cfg = _cfg(standin_snapshots)
    cfg.zeroshot.labels = [*cfg.zeroshot.labels, "knee X-ray of nothing"]
    cfg.zeroshot.knee_label = "knee X-ray of nothing"
    zeroshot.run(tiny_run, cfg)
    qc = read_zeroshot_summary(tiny_run)
    misses = int(qc["overall"]["n"]) - int(qc["overall"]["identified"])
    assert misses > 0
    assert len(qc["failures"]) == min(12, misses)
    assert zeroshot_section(tiny_run, cfg).count("data:image/png;base64") == min(6, misses)


def test_an_encoder_without_text_cannot_do_zero_shot(tiny_run):
    cfg = Config()
    cfg.zeroshot.encoder = "rad-dino"
    with pytest.raises(ConfigError, match="zeroshot.encoder 'rad-dino' has no text tower.*Use one of: biomedclip"):
        zeroshot.run(tiny_run, cfg)
    assert not (tiny_run / "arms").exists()


def test_zeroshot_reuses_projected_embeddings(tiny_run, standin_snapshots, monkeypatch):
    from kneeoa.stages import embed

    cfg = _cfg(standin_snapshots)
    embed.embed_one(tiny_run, "biomedclip", None, cfg, progress=False)

    def refuse(self, images):
        raise AssertionError("image tower ran again")

    monkeypatch.setattr(ClipEncoder, "encode_projected", refuse)
    zeroshot.run(tiny_run, cfg)
    assert read_arms(tiny_run)["biomedclip_zeroshot"]["status"] == "ran"
    section = embeddings_section(tiny_run, cfg)
    assert "microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224" in section
    assert "open_clip_config.json" in section


def test_without_weights_the_arm_is_not_run_and_the_report_says_why(tiny_run, tmp_path):
    cfg = Config()
    cfg.foundation.weights = {"biomedclip": str(tmp_path / "absent"), "rad-dino": str(tmp_path / "absent")}
    zeroshot.run(tiny_run, cfg)
    rec = read_arms(tiny_run)["biomedclip_zeroshot"]
    assert rec["status"] == "not_run" and "BiomedCLIP-PubMedBERT_256" in rec["reason"]
    assert not prediction_path(tiny_run, "biomedclip_zeroshot", "knee_id").exists()
    assert "did not run" in zeroshot_section(tiny_run, cfg)
    from kneeoa.stages import embed

    embed.run(tiny_run, cfg)
    section = embeddings_section(tiny_run, cfg)
    assert "raddino_xgb</b> did not run" in section and "huggingface-cli download" in section


def test_disabled_zeroshot_is_recorded(tiny_run):
    cfg = Config()
    cfg.zeroshot.enabled = False
    zeroshot.run(tiny_run, cfg)
    assert read_arms(tiny_run)["biomedclip_zeroshot"]["reason"] == "zeroshot.enabled is false in the config."


def test_a_zero_shot_arm_is_re_run_on_crops_for_its_occlusion_maps(finished_run):
    """The zero-shot arm re-grades crops with the prompts its record holds and reproduces its own table; the explain
    stage draws its occlusion maps like any other arm's."""
    from kneeoa.arms.predictors import arm_predictor
    from kneeoa.runfolder.manifest import load_knee
    from kneeoa.runfolder.montages import OCCLUSION

    run, cfg = finished_run
    manifest = read_manifest(run).set_index("image_id")
    _, _, table = read_predictions(prediction_path(run, "biomedclip_zeroshot", "klg"))
    rows = table[table["split"] == "test"].head(5)
    crops = [load_knee(run, manifest.loc[i].to_dict()) for i in rows["image_id"]]
    got = arm_predictor(run, "biomedclip_zeroshot", "klg", cfg)(crops)
    np.testing.assert_allclose(got, rows[[f"prob_{k}" for k in range(5)]].to_numpy(), atol=1e-4)
    assert "biomedclip_zeroshot" in {m["arm"] for m in OCCLUSION.read_index(run)["montages"]}
