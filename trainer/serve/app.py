"""The FastAPI app: an upload page and a JSON API over one Classifier.

    GET  /          the page (static/index.html: pick or drop a picture, see the top-5 as bars)
    POST /predict   multipart file or raw image bytes, ?k=5 -> {"top": [{"label", "index", "prob"}], "model", ...}
    GET  /health    503 until a warm-up inference has run, then 200
    GET  /info      classes, preprocessing, checkpoint sha256, limits, versions

    upload (<= max_upload_bytes, else 413) -> Classifier.prepare in a worker thread (a bad image: 4xx for
    this request only) -> Batcher (bounded batch and wait) -> top-k

FastAPI + uvicorn: the well-kept pair for an async JSON API with file uploads (python-multipart spools
big parts to disk) and static files, with OpenAPI docs at /docs for free.
"""

from __future__ import annotations

import asyncio
import http
import platform
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from PIL import Image
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from trainer import __version__
from shardtool.config import MAX_PIXELS
from trainer.data.images import BadImage
from trainer.infer import Classifier
from trainer.serve.batcher import Batcher

STATIC = Path(__file__).parent / "static"
STATUS = {"empty": 400, "not_an_image": 415, "unsupported_format": 415, "corrupt_image": 422,
          "too_many_pixels": 422, "resize_too_large": 422, "file_too_large": 413, "unreadable_file": 400,
          "missing_file": 400, "not_a_regular_file": 400}


@dataclass(frozen=True)
class ServeConfig:
    max_batch: int = 16
    max_wait_ms: float = 5.0
    max_upload_bytes: int = 20 * 1024 * 1024
    max_pixels: int = MAX_PIXELS
    default_k: int = 5


def create_app(classifier: Classifier, config: ServeConfig = ServeConfig()) -> FastAPI:
    batcher = Batcher(classifier, config.max_batch, config.max_wait_ms / 1000)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        batcher.start()
        app.state.ready = False
        app.state.warmup = asyncio.create_task(warm_up(app, classifier, batcher))
        yield
        await batcher.stop()

    app = FastAPI(title="trainer serve", version=__version__, lifespan=lifespan)
    app.add_middleware(LimitUpload, max_bytes=config.max_upload_bytes)
    app.add_exception_handler(StarletteHTTPException, refused)  # type: ignore[arg-type]  # every 4xx: detail + reason
    app.add_exception_handler(RequestValidationError, invalid)  # type: ignore[arg-type]
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    @app.get("/health")
    async def health(request: Request) -> JSONResponse:
        ready = request.app.state.ready
        return JSONResponse({"status": "ok" if ready else "warming up"}, status_code=200 if ready else 503)

    @app.get("/info")
    async def info() -> dict[str, Any]:
        return classifier.info() | {"limits": asdict(config), "batches_run": batcher.batches,
                                    "versions": {"trainer": __version__, "torch": torch.__version__,
                                                 "python": platform.python_version()}}

    @app.post("/predict")
    async def predict(request: Request, k: int = Query(config.default_k, ge=1, le=1000)) -> JSONResponse:
        data = await read_upload(request)
        try:
            image = await run_in_threadpool(classifier.prepare, data, config.max_pixels)
        except BadImage as error:
            return JSONResponse({"detail": str(error), "reason": error.reason}, status_code=STATUS.get(error.reason, 422))
        probs = await batcher.submit(image)
        top = [asdict(label) for label in classifier.top(probs, k)]
        return JSONResponse({"top": top, "model": classifier.model_name, "checkpoint_sha256": classifier.sha256})

    return app


async def warm_up(app: FastAPI, classifier: Classifier, batcher: Batcher) -> None:
    """One inference through the real path before /health says 200 (first-call costs: allocation, kernels)."""
    size = classifier.preprocessing.resize_shorter
    await batcher.submit(classifier.prepare(Image.new("RGB", (size, size), (128, 128, 128))))
    app.state.ready = True


async def read_upload(request: Request) -> bytes:
    """The image bytes: the multipart form's file (the field named `file`, else the first file), or the body."""
    if request.headers.get("content-type", "").startswith("multipart/form-data"):
        form = await request.form(max_files=4, max_fields=16)
        files = [value for _, value in form.multi_items() if isinstance(value, UploadFile)]
        chosen = form.get("file") if isinstance(form.get("file"), UploadFile) else (files[0] if files else None)
        if chosen is None:
            raise Refused(400, "the form has no file: send the image as a `file` field", "no_file")
        return await chosen.read()
    return await request.body()


class Refused(HTTPException):
    """An HTTPException with the `reason` every error body carries (README: `{"detail", "reason"}`)."""

    def __init__(self, status: int, detail: str, reason: str) -> None:
        super().__init__(status, detail)
        self.reason = reason


async def refused(request: Request, error: StarletteHTTPException) -> JSONResponse:
    """Ours (Refused), and starlette's own: 404, 405, a malformed multipart body (400)."""
    reason = getattr(error, "reason", None) or http.HTTPStatus(error.status_code).phrase.lower().replace(" ", "_")
    return JSONResponse({"detail": str(error.detail), "reason": reason}, status_code=error.status_code,
                        headers=getattr(error, "headers", None))


async def invalid(request: Request, error: RequestValidationError) -> JSONResponse:
    """A query parameter out of range or of the wrong type (?k=0, ?k=abc): one line, not pydantic's list."""
    first = error.errors()[0]
    where = ".".join(str(part) for part in first.get("loc", ())[1:]) or "request"
    return JSONResponse({"detail": f"{where}: {first.get('msg', 'invalid')}", "reason": "bad_parameter"},
                        status_code=422)


class LimitUpload:
    """413 for a request body over MAX_BYTES: by its Content-Length before reading, or while it streams in."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_bytes:
            response = JSONResponse({"detail": self.message(), "reason": "too_large"}, status_code=413)
            await response(scope, receive, send)
            return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise Refused(413, self.message(), "too_large")
            return message

        await self.app(scope, limited, send)

    def message(self) -> str:
        return f"upload over the limit of {self.max_bytes / 1e6:g} MB (trainer serve --max-upload-mb)"
