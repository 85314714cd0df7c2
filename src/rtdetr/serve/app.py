"""The detection service: a FastAPI app around any `Detector` (PyTorch, ONNX Runtime, ...).

    app = create_app(load_detector("best.pt"), ServiceSettings(max_batch=8))
    uvicorn.run(app, host="127.0.0.1", port=8000)        # what `rtdetr serve` does

Endpoints: `POST /v1/detect` (multipart field `image`, or JSON `{"image": "<base64>"}`; query parameters
`score_threshold`, `max_detections`), `GET /v1/model`, `GET /healthz`, the OpenAPI schema at `/openapi.json`
(pages at `/docs`), and a web page at `/` to try it. Boxes are pixel xyxy in the uploaded image, the same as
`Detector.predict` gives for that file. A bad request gets a 4xx with a message and the server goes on:
400 malformed body, 411 no Content-Length, 413 body over the limit, 415 other content types, 422 an
image that cannot be read (empty, not an image, truncated, a decompression bomb) or bad parameters, 503
when the request queue is full.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources
from typing import Any

from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse
from PIL import Image
from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.datastructures import UploadFile

from ..config import PRESETS, config_dict
from ..data.images import load_image
from ..inference.detector import Detector
from ..postprocess import Detections
from .batching import BatchQueue, ServiceBusy

QUERY_PARAMETERS = ("score_threshold", "max_detections")
# The backend, by the module of the detector's class (a detector may also say its `backend` itself).
BACKENDS = {"api": "pytorch", "onnxruntime": "onnxruntime", "openvino": "openvino"}
# The fields that make a preset's architecture (a checkpoint may differ in classes, input size, decoder layers kept).
ARCHITECTURE_FIELDS = ("version", "backbone", "depth", "stem_channels", "stage_channels", "stage_blocks",
                       "encoder_hidden_dim", "num_encoder_layers", "expansion", "depth_mult", "hidden_dim")  # fmt: skip


@dataclass(frozen=True)
class ServiceSettings:
    """max_batch / max_wait_ms: dynamic batching (see `serve.batching`); queue_size: requests that may wait
    before the service answers 503; max_upload_bytes: the largest request body; max_pixels: the largest
    declared image (width x height, checked before decoding); image_size, amp: passed to `predict`."""

    max_batch: int = 8
    max_wait_ms: float = 10.0
    queue_size: int = 64
    max_upload_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 40_000_000
    image_size: tuple[int, int] | None = None
    amp: str = "off"


class Detection(BaseModel):
    box: list[float]  # x1, y1, x2, y2 in pixels of the uploaded image
    score: float
    category_id: int
    class_name: str


class ImageInfo(BaseModel):
    width: int
    height: int


class DetectResponse(BaseModel):
    detections: list[Detection]
    image: ImageInfo
    timing_ms: dict[str, float]  # decode, queue (waiting for the batch), inference (the batch), total
    batch_size: int  # images in the model call this request was part of


class DetectJson(BaseModel):
    """The JSON request body: the image file's bytes in base64 (a `data:` URL prefix is allowed)."""

    model_config = ConfigDict(extra="forbid")
    image: str


class ModelClass(BaseModel):
    category_id: int
    name: str


class ModelInfo(BaseModel):
    variant: str | None
    backend: str
    input_size: list[int] | None  # height, width
    classes: list[ModelClass]


UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {"type": "object", "required": ["image"],
                           "properties": {"image": {"type": "string", "format": "binary"}}},
            },
            "application/json": {"schema": DetectJson.model_json_schema()},
        },
    }
}  # fmt: skip


def create_app(detector: Detector, settings: ServiceSettings | None = None) -> FastAPI:
    """The service for `detector`; its batch worker runs while the app is being served (lifespan)."""
    settings = settings or ServiceSettings()
    batcher = BatchQueue(detector, settings.max_batch, settings.max_wait_ms / 1000, settings.queue_size,
                         settings.image_size, settings.amp)  # fmt: skip
    info = model_info(detector, settings.image_size)
    page = resources.files("rtdetr.serve").joinpath("page.html").read_text()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await batcher.start()
        yield
        await batcher.stop()

    app = FastAPI(title="rtdetr detection service", summary="RT-DETR object detection over HTTP", lifespan=lifespan)
    app.state.batcher = batcher

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index() -> str:
        return page

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        """Liveness: 'ok', the requests waiting and the batches run so far."""
        return {"status": "ok", "queued": batcher.depth(), "batches": len(batcher.batch_sizes)}

    @app.get("/v1/model", response_model=ModelInfo)
    async def model() -> ModelInfo:
        """The served model: variant, backend, input size (height, width) and classes."""
        return info

    @app.post("/v1/detect", response_model=DetectResponse, openapi_extra=UPLOAD_BODY, responses={
        400: {"description": "malformed body"}, 411: {"description": "no Content-Length"},
        413: {"description": "body too large"}, 415: {"description": "unsupported content type"},
        422: {"description": "unreadable image or bad parameters"}, 503: {"description": "queue full, retry"},
    })  # fmt: skip
    async def detect(
        request: Request,
        score_threshold: float = Query(0.5, ge=0.0, le=1.0, description="keep detections scoring above this"),
        max_detections: int = Query(300, ge=1, le=300, description="at most this many, best first"),
    ) -> DetectResponse:
        """Detect objects in one image: multipart/form-data with the file in the field `image`, or
        application/json `{"image": "<base64 of the file>"}`."""
        started = time.perf_counter()
        unknown = sorted(set(request.query_params) - set(QUERY_PARAMETERS))
        if unknown:
            raise HTTPException(422, f"unknown query parameter(s) {unknown}; accepted: {', '.join(QUERY_PARAMETERS)}")
        data, name = await read_upload(request, settings.max_upload_bytes)
        image = await run_in_threadpool(decode_image, data, name, settings.max_pixels)
        decoded = time.perf_counter()
        try:
            detections, timing = await batcher.submit(image, score_threshold, max_detections)
        except ServiceBusy as error:
            raise HTTPException(503, str(error), headers={"Retry-After": "1"}) from None
        timing = {"decode": (decoded - started) * 1000, **timing, "total": (time.perf_counter() - started) * 1000}
        batch_size = int(timing.pop("batch_size"))
        return DetectResponse(detections=detection_list(detections), image=ImageInfo(width=image.width,
                              height=image.height), timing_ms=timing, batch_size=batch_size)  # fmt: skip

    return app


async def read_upload(request: Request, limit: int) -> tuple[bytes, str]:
    """The uploaded file's bytes and a name for messages, from a multipart or JSON body of at most `limit`
    bytes (the declared Content-Length is checked before reading: the server never reads more)."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind not in ("multipart/form-data", "application/json"):
        raise HTTPException(415, f"content type '{kind or 'none'}' is not accepted: send multipart/form-data "
                            "with the image file in the field 'image', or application/json {\"image\": \"<base64>\"}")
    length = request.headers.get("content-length")
    if length is None or not length.isdigit():
        raise HTTPException(411, "send the body with a Content-Length header (chunked uploads are not accepted)")
    if int(length) > limit:
        raise HTTPException(413, f"the body is {int(length)} bytes; the limit is {limit} bytes ({limit / 2**20:g} MiB)")
    body = await request.body()
    if kind == "application/json":
        return _json_image(body), "the JSON image"
    async with request.form(max_files=1, max_fields=0) as form:
        upload = form.get("image")
        others = sorted(set(form.keys()) - {"image"})
        if others or not isinstance(upload, UploadFile):
            raise HTTPException(400, f"the form needs exactly one file field 'image'; got fields {sorted(form.keys())}")
        return await upload.read(), f"upload '{upload.filename}'"


def _json_image(body: bytes) -> bytes:
    try:
        request = DetectJson.model_validate_json(body)
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in error.errors())
        raise HTTPException(400, f'the JSON body must be {{"image": "<base64>"}}: {problems}') from None
    text = request.image.split(",", 1)[1] if request.image.startswith("data:") else request.image
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as error:
        raise HTTPException(400, f"the 'image' field is not valid base64: {error}") from None


class _NamedBytes(io.BytesIO):
    """Bytes that read like a file and print as `name` in `load_image`'s messages."""

    def __init__(self, data: bytes, name: str) -> None:
        super().__init__(data)
        self.label = name

    def __str__(self) -> str:
        return self.label

    __repr__ = __str__  # PIL names the file with %r


def decode_image(data: bytes, name: str, max_pixels: int) -> Image.Image:
    """An RGB image (EXIF orientation applied) or a 422 naming the problem."""
    if not data:
        raise HTTPException(422, f"cannot read image {name}: it is empty (0 bytes)")
    try:
        return load_image(_NamedBytes(data, name), max_pixels=max_pixels)  # type: ignore[arg-type]
    except ValueError as error:
        raise HTTPException(422, str(error)) from None


def detection_list(detections: Detections) -> list[Detection]:
    columns = zip(detections.boxes.tolist(), detections.scores.tolist(), detections.labels.tolist(),
                  detections.class_names)  # fmt: skip
    return [Detection(box=box, score=score, category_id=c, class_name=n) for box, score, c, n in columns]


def model_info(detector: Detector, image_size: tuple[int, int] | None = None) -> ModelInfo:
    """What `/v1/model` reports, read from the detector: a PyTorch model's config, an export's metadata."""
    config = getattr(detector, "config", None)
    fields = config_dict(config) if config is not None else {}
    if not fields and "model_config" in (getattr(detector, "metadata", None) or {}):
        fields = json.loads(detector.metadata["model_config"])  # type: ignore[attr-defined]
    size = image_size or getattr(detector, "image_size", None) or fields.get("image_size")
    module = type(detector).__module__.rsplit(".", 1)[-1]
    backend = getattr(detector, "backend", None) or BACKENDS.get(module, type(detector).__name__)
    classes = [ModelClass(category_id=c, name=n) for c, n in zip(detector.category_ids, detector.class_names)]
    return ModelInfo(variant=variant_name(fields), backend=str(backend), input_size=list(size) if size else None,
                     classes=classes)  # fmt: skip


def variant_name(fields: dict[str, Any]) -> str | None:
    """The preset with the architecture of these config fields ('rtdetr_r18vd', ...), 'custom' for none, None
    when the detector has no config."""
    if not fields:
        return None
    for name, config in PRESETS.items():
        reference = config_dict(config)
        if all(fields.get(key) == reference[key] for key in ARCHITECTURE_FIELDS):
            return name
    return "custom"
