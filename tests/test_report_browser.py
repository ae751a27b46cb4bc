"""The report in a real browser: headless Chromium loads report.html, no errors, every image decodes.

Needs the Debian `chromium` package (`apt-get install chromium`); skipped, saying so, where it is absent. Instead of
a DevTools-protocol client, a small script is injected at the top of a copy of the page: it records script errors,
failed resource loads and console.error calls, and on `load` writes the results (and every <img>'s naturalWidth)
into the DOM, which `chromium --dump-dom` prints.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest

from kneeoa.config import Config

CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic",
         "--virtual-time-budget=10000"]
PROBE = """<script>
window.__kneeoaErrors = [];
window.addEventListener("error", function (e) {
  var t = e.target || {};
  window.__kneeoaErrors.push(e.message ? "error: " + e.message : "failed to load: " + (t.src || t.href || t.tagName));
}, true);
(function () { var orig = console.error; console.error = function () {
  window.__kneeoaErrors.push("console.error: " + Array.prototype.join.call(arguments, " "));
  orig.apply(console, arguments);
}; })();
window.addEventListener("load", function () {
  var imgs = Array.prototype.slice.call(document.images);
  var out = {images: imgs.length,
             broken: imgs.filter(function (i) { return !(i.complete && i.naturalWidth > 0); }).map(function (i) {
               return i.alt; }),
             widths: imgs.map(function (i) { return i.naturalWidth; }),
             errors: window.__kneeoaErrors,
             failed_sections: document.querySelectorAll(".err").length,
             sections: Array.prototype.map.call(document.querySelectorAll("section"), function (s) { return s.id; })};
  var pre = document.createElement("pre"); pre.id = "kneeoa-check"; pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
});
</script>"""


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """A small report: two arms' synthetic prediction tables, a CAM-scored stand-in CNN, every stage after training."""
    import numpy as np

    from kneeoa.report.html import build_report
    from kneeoa.runfolder.predictions import make_prediction_table, write_predictions
    from kneeoa.stages import get_stage
    from test_explain import make_cam_run

    run_dir = tmp_path_factory.mktemp("run")
    manifest = make_cam_run(run_dir, n_patients=8)
    rng = np.random.default_rng(1)
    for task, k in (("osteophytes", 2), ("klg", 5)):
        y = manifest[task].to_numpy()
        logits = rng.normal(size=(len(y), k))
        logits[np.arange(len(y)), y] += 2
        probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
        write_predictions(make_prediction_table(manifest["image_id"], manifest["split"], y, probs), run_dir,
                          "raddino_xgb", task)
    cfg = Config(name="browser-check")
    cfg.tasks.names = ["klg", "osteophytes"]
    cfg.stats.n_boot = 100
    cfg.explain.per_grade = 1
    cfg.explain.occlusion_patch, cfg.explain.occlusion_stride = 0.5, 0.5  # 5 passes a map
    for stage in ("evaluate", "stats", "explain"):
        get_stage(stage)(run_dir, cfg)
    return build_report(run_dir, cfg)


def _chromium(args, tmp_path):
    profile = tmp_path / "profile"
    return subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", *args], capture_output=True, text=True,
                          timeout=120)


@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium not installed (Debian: apt-get install chromium)")
def test_report_loads_cleanly_in_chromium(report, tmp_path):
    page = report.read_text(encoding="utf-8")
    probed = tmp_path / "report_probe.html"
    probed.write_text(page.replace("<head>", "<head>" + PROBE, 1), encoding="utf-8")
    proc = _chromium(["--dump-dom", probed.as_uri()], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    found = re.search(r'<pre id="kneeoa-check">(.*?)</pre>', proc.stdout, re.S)
    assert found, f"the page never fired 'load'; stderr: {proc.stderr[-2000:]}"
    result = json.loads(found.group(1).replace("&quot;", '"').replace("&amp;", "&"))
    assert result["errors"] == []
    assert result["failed_sections"] == 0
    assert {"comparisons", "roc_ci", "calibration", "gradcam"} <= set(result["sections"])
    assert result["images"] >= 4 and result["broken"] == []
    assert all(w > 0 for w in result["widths"])
    assert "Uncaught" not in proc.stderr


@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium not installed (Debian: apt-get install chromium)")
def test_report_screenshot(report, tmp_path):
    shot = report.parent / "report.png"
    proc = _chromium([f"--screenshot={shot}", "--window-size=1280,4000", report.as_uri()], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000
