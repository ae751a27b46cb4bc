"""`kneeoa serve`: the real server on loopback, driven with a real HTTP client."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest

from kneeoa.deploy.inputs import collect_inputs
from kneeoa.deploy.package import load_model
from kneeoa.deploy.predict import predict_files
from real_data import NONKNEE, needs_kneekl224, needs_nonknee, real_film

pytest_plugins = ["deploy_fixtures"]
TIMEOUT = httpx.Timeout(120.0)


def _post(url: str, name: str, data: bytes) -> httpx.Response:
    return httpx.post(f"{url}/api/predict", files={"file": (name, data)}, timeout=TIMEOUT)


def test_health_model_card_and_page(live_server):
    assert httpx.get(f"{live_server.url}/healthz").json() == {"status": "ok", "arm": "resnet18"}
    card = httpx.get(f"{live_server.url}/api/model").json()
    assert card["model"]["arm"] == "resnet18" and "Not a medical device" in card["card"]
    page = httpx.get(f"{live_server.url}/")
    assert page.status_code == 200 and "resnet18" in page.text and 'type="file"' in page.text


def test_film_upload_grades_both_knees_like_predict(live_server, cnn_package, phantom_films, tmp_path):
    answer = _post(live_server.url, "film.dcm", phantom_films[0].read_bytes())
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert [k["side"] for k in body["knees"]] == ["R", "L"] and body["qc"]["knees_found"] == 2
    table = predict_files(load_model(cnn_package), collect_inputs(phantom_films[:1]), tmp_path, progress=False)
    for knee in body["knees"]:
        row = table[table["side"] == knee["side"]].iloc[0]
        for task, result in knee["tasks"].items():
            assert result["class"] == row[task]
            expected = [row[f"{task}_p{k}"] for k in range(len(result["probs"]))]
            assert np.allclose(result["probs"], expected, atol=1e-5)
        assert knee["crop_png"] and knee["cam_png"] and knee["cam_task"] == "klg"


def test_twenty_concurrent_uploads_are_all_answered(live_server, phantom_films):
    films = [phantom_films[i % len(phantom_films)] for i in range(20)]
    with ThreadPoolExecutor(max_workers=20) as pool:
        answers = list(pool.map(lambda f: _post(live_server.url, f.name, f.read_bytes()), films))
    assert [a.status_code for a in answers] == [200] * 20
    by_film: dict = {}
    for film, a in zip(films, answers, strict=True):
        grades = [(k["side"], k["tasks"]["klg"]["class"]) for k in a.json()["knees"]]
        assert len(grades) == 2
        assert by_film.setdefault(film, grades) == grades  # same film, same answer


@pytest.mark.parametrize(("name", "data", "status", "message"), [
    ("notes.txt", b"just some text", 415, "not an image kneeoa reads"),
    ("broken.dcm", b"\0" * 128 + b"DICM" + b"\x02\x00\x10\x00garbage" * 10, 422, "DICOM"),
    ("empty.png", b"", 422, "is empty"),
    ("cut.png", b"\x89PNG\r\n\x1a\n" + b"\0" * 40, 422, "cannot be read as an image"),
])
def test_bad_uploads_get_a_4xx_json_error(live_server, name, data, status, message):
    answer = _post(live_server.url, name, data)
    assert answer.status_code == status, answer.text
    assert message in answer.json()["error"]


def test_request_errors(live_server):
    url = live_server.url
    big = httpx.post(f"{url}/api/predict", files={"file": ("big.dcm", b"\0" * (3 * 2**20))}, timeout=TIMEOUT)
    assert big.status_code == 413 and "limit" in big.json()["error"]
    no_file = httpx.post(f"{url}/api/predict", files={"other": ("x.png", b"x")}, timeout=TIMEOUT)
    assert no_file.status_code == 400 and "'file'" in no_file.json()["error"]
    not_form = httpx.post(f"{url}/api/predict", content=b"raw", headers={"content-type": "image/png"})
    assert not_form.status_code == 400 and "multipart" in not_form.json()["error"]
    chunked = httpx.post(f"{url}/api/predict", content=iter([b"--x\r\n"]),
                         headers={"content-type": "multipart/form-data; boundary=x"})
    assert chunked.status_code == 411 and "Content-Length" in chunked.json()["error"]
    missing = httpx.get(f"{url}/nothing-here")
    assert missing.status_code == 404 and "/api/predict" in missing.json()["error"]


def test_server_writes_nothing_outside_its_temp_folder(live_server, phantom_films, cnn_package, tmp_path):
    before = sorted(p.relative_to(cnn_package) for p in cnn_package.rglob("*"))
    assert _post(live_server.url, "film.dcm", phantom_films[0].read_bytes()).status_code == 200
    assert sorted(p.relative_to(cnn_package) for p in cnn_package.rglob("*")) == before


@needs_kneekl224
def test_builtin_server_grades_a_real_film_and_says_why_the_missing_knee_is_not_graded(builtin_server, tmp_path):
    film, _ = real_film(tmp_path / "film.dcm", missing="L")
    answer = _post(builtin_server.url, "film.dcm", film.read_bytes())
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert [k["side"] for k in body["knees"]] == ["R"] and body["knees"][0]["knee_score"] > 0
    assert [r["side"] for r in body["not_graded"]] == ["L"] and body["not_graded"][0]["reason"]


@needs_nonknee
def test_builtin_server_refuses_a_chest_radiograph_with_its_reason(builtin_server):
    chest = sorted((NONKNEE / "chest_openist").glob("*.jp*g"))[0]
    answer = _post(builtin_server.url, chest.name, chest.read_bytes())
    assert answer.status_code == 422, answer.text
    body = answer.json()
    assert "knee check" in body["error"] and body["not_graded"][0]["knee_score"] < 0.0025
