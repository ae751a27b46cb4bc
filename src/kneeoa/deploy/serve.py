"""`kneeoa serve`: a small web application around one model package (FastAPI on uvicorn).

Routes:
- `GET /`: the upload page (`page.html`): drop a DICOM film or a knee image, see each knee's crop, its Grad-CAM
  overlay, the KL grade and the feature probabilities as bars, and the QC flags.
- `POST /api/predict` (multipart field `file`): `{"file", "kind", "knees": [{"side", "tasks": {T: {"class",
  "class_name", "probs"}}, "localizer_confidence", "knee_score", "qc_flags", "crop_png", "cam_png", "cam_task"}],
  "not_graded": [{"side", "reason", "knee_score"}], "qc": {...}}`; images are base64 PNG. `not_graded` lists every
  knee of the file that was not graded: not found by the localiser, or refused by the knee check. A package whose
  weights give non-finite outputs answers 503.
- `GET /api/model`: model.json and the model card; `GET /healthz`: `{"status": "ok", "arm": ...}`.

Errors answer `{"error": "..."}` with a 4xx status: 411 without a Content-Length, 413 over the upload limit,
415 for files that are not DICOM, PNG or JPEG, 422 for files that cannot be decoded or localised or that are not
knee radiographs (with `not_graded` when the knee check refused them), 400 for a request without a `file` field.

The model is loaded once, when the application is made. Uploads and crops live in a temporary folder removed after
each request; nothing else is written. Requests are graded one at a time (a lock): Grad-CAM hooks the model's
layers, and on a small CPU server parallel requests would only share the same cores.
"""

from __future__ import annotations

import base64
import re
import tempfile
import threading
from importlib import resources
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from kneeoa.deploy.inputs import InputFile
from kneeoa.deploy.package import KneeModel, load_model
from kneeoa.deploy.predict import QC_FLAGS, explain, grade_films, overlay_png
from kneeoa.errors import KneeoaError
from kneeoa.localize.films import SIDE_WORDS
from kneeoa.tasks import primary_task

#: Default upload limit: a large uncompressed bilateral film is ~50 MB.
MAX_UPLOAD_MB = 64.0
_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")


class UploadRejected(Exception):
    """An upload the API answers with a 4xx status and a message."""

    def __init__(self, status: int, message: str, not_graded: list[dict[str, Any]] | None = None) -> None:
        super().__init__(message)
        self.status, self.not_graded = status, not_graded or []


def _b64(png: bytes) -> str:
    return base64.b64encode(png).decode("ascii")


def cam_task(info: dict[str, Any]) -> str:
    """The task whose Grad-CAM the page shows: the study's primary task (the KL grade) where the model has it, else
    its first task."""
    primary = primary_task()
    return primary if primary in info["tasks"] else next(iter(info["tasks"]))


def grade_upload(model: KneeModel, data: bytes, filename: str) -> dict[str, Any]:
    """The JSON answer for one uploaded file (see the module docstring).

    Raises:
        UploadRejected: not an image (415), undecodable or no knee found (422).
    """
    from kneeoa.deploy.inputs import read_facts
    from kneeoa.errors import DataError

    info = model.info
    shown = cam_task(info)
    with tempfile.TemporaryDirectory(prefix="kneeoa-serve-") as tmp:
        path = Path(tmp) / (_SAFE_NAME.sub("_", Path(filename or "upload").name)[:80] or "upload")
        path.write_bytes(data)
        try:
            read_facts(path)
        except DataError as e:
            raise UploadRejected(415, f"{filename or 'the upload'} is not an image kneeoa reads: expected a DICOM "
                                      f"film or a PNG or JPEG knee image ({e})") from e
        film, = grade_films(model, [InputFile(path)], Path(tmp) / "crops")
        if film.error:
            raise UploadRejected(422, f"{filename or 'the upload'}: {film.error.replace(str(path), 'the file')}")
        not_graded = [{"side": side, "reason": reason,
                       "knee_score": next((k.knee_score for k in film.refused if k.side == side), None)}
                      for side, reason in film.reasons().items()]
        if not film.knees:
            raise UploadRejected(422, f"{filename or 'the upload'}: "
                                      + "; ".join(f"{SIDE_WORDS.get(r['side'], r['side'])} knee: {r['reason']}"
                                                  for r in not_graded), not_graded)
        knees = []
        for knee in film.knees:
            explain(model, knee, [shown])
            knees.append({
                "side": knee.side,
                "tasks": {t: {"class": knee.classes[t], "class_name": info["tasks"][t]["classes"][knee.classes[t]],
                              "probs": [float(v) for v in p]} for t, p in knee.probs.items()},
                "localizer_confidence": None if knee.confidence != knee.confidence else knee.confidence,
                "knee_score": None if knee.knee_score != knee.knee_score else knee.knee_score,
                "qc_flags": knee.flags,
                "crop_png": _b64(overlay_png(knee.crop, None)),
                "cam_png": _b64(overlay_png(knee.crop, knee.cams[shown])) if shown in knee.cams else None,
                "cam_task": shown if shown in knee.cams else None})
    flags = sorted({f for k in film.knees for f in k.flags})
    return {"file": filename, "kind": film.kind, "knees": knees, "not_graded": not_graded,
            "qc": {"kind": film.kind, "knees_found": len(knees), "missed": film.missed, "flags": flags,
                   "flag_meanings": {f: QC_FLAGS[f] for f in flags}}}


def create_app(model_dir: Path, *, max_upload_mb: float = MAX_UPLOAD_MB,
               encoder_weights: Path | None = None) -> FastAPI:
    """The FastAPI application serving one model package (loaded here, once)."""
    model = load_model(model_dir, encoder_weights=encoder_weights)
    card = (Path(model_dir) / "README.md").read_text(encoding="utf-8")
    page = resources.files("kneeoa.deploy").joinpath("page.html").read_text(encoding="utf-8")
    limit = int(max_upload_mb * 1024 * 1024)
    lock = threading.Lock()
    app = FastAPI(title=f"kneeoa: {model.info['arm']}", docs_url=None, redoc_url=None)

    def error(status: int, message: str, not_graded: list[dict[str, Any]] | None = None) -> JSONResponse:
        return JSONResponse({"error": message, **({"not_graded": not_graded} if not_graded else {})},
                            status_code=status)

    def locked_grade(data: bytes, filename: str) -> dict[str, Any]:
        with lock:
            return grade_upload(model, data, filename)

    @app.get("/", response_class=HTMLResponse)
    def index() -> str:
        return page.replace("{{arm}}", model.info["arm"])

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok", "arm": model.info["arm"]}

    @app.get("/api/model")
    def model_card() -> dict[str, Any]:
        return {"model": model.info, "card": card}

    @app.post("/api/predict")
    async def predict(request: Request):
        size = request.headers.get("content-length", "")
        if not size.isdigit():  # a body of unknown length could not be refused before it is spooled
            return error(411, "send the upload with a Content-Length header")
        if int(size) > limit:
            return error(413, f"upload of {int(size) / 2**20:.1f} MB is over the {max_upload_mb:g} MB limit")
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            return error(400, "send the file as multipart/form-data in a field named 'file'")
        async with request.form(max_files=1, max_fields=4, max_part_size=limit) as form:
            upload = form.get("file")
            if upload is None or isinstance(upload, str):
                return error(400, "no file: send it in the multipart field 'file'")
            data = await upload.read(limit + 1)
            name = upload.filename or "upload"
        if len(data) > limit:
            return error(413, f"upload is over the {max_upload_mb:g} MB limit")
        if not data:
            return error(422, f"{name} is empty")
        try:
            return await run_in_threadpool(locked_grade, data, name)
        except UploadRejected as e:
            return error(e.status, str(e), e.not_graded)
        except KneeoaError as e:  # the package itself failed (damaged weights): the upload was fine
            return error(503, f"the model could not grade {name}: {e}")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # Routing and multipart-parsing failures keep the API's one error shape.
        hint = "; routes: /, /api/predict, /api/model, /healthz" if exc.status_code == 404 else ""
        return error(exc.status_code, f"{exc.detail} ({request.method} {request.url.path}){hint}")

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error(422, f"invalid request to {request.url.path}: {exc.errors()}")

    return app


def serve(model_dir: Path, *, host: str = "127.0.0.1", port: int = 8000, max_upload_mb: float = MAX_UPLOAD_MB,
          encoder_weights: Path | None = None) -> None:
    """Load the package and serve it with uvicorn until interrupted."""
    import uvicorn

    app = create_app(model_dir, max_upload_mb=max_upload_mb, encoder_weights=encoder_weights)
    uvicorn.run(app, host=host, port=port, log_level="info")
