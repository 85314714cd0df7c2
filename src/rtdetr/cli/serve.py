"""`rtdetr serve`: the detection service (`rtdetr.serve`) on uvicorn, for any weights `predict` takes."""

from __future__ import annotations

import argparse

from ..api import load_detector
from ..serve import ServiceSettings, create_app
from .arguments import add_amp, add_device, add_image_size, add_model_arguments, resolve_device


def run(args: argparse.Namespace) -> int:
    import uvicorn  # only this verb needs the server

    detector = load_detector(args.weights, args.preset, args.decoder_layers, resolve_device(args.device),
                             cross_attn_method=args.cross_attn_method)  # fmt: skip
    settings = ServiceSettings(
        max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, queue_size=args.queue_size,
        max_upload_bytes=int(args.max_upload_mb * 2**20), max_pixels=args.max_pixels, image_size=args.img_size,
        amp=args.amp,
    )  # fmt: skip
    print(f"rtdetr serve: http://{args.host}:{args.port}/ (web page), POST /v1/detect, docs at /docs")
    uvicorn.run(create_app(detector, settings), host=args.host, port=args.port, log_level=args.log_level)
    return 0


def add(sub: argparse._SubParsersAction) -> None:
    defaults = ServiceSettings()
    p = sub.add_parser("serve", help="an HTTP detection service with a web page (FastAPI + uvicorn)",
                       description="Serve the model over HTTP: POST /v1/detect (multipart field 'image' or JSON "
                       "base64), GET /v1/model, GET /healthz, the OpenAPI schema at /openapi.json and a web page "
                       "at / to try it. Concurrent requests are batched for the model.")  # fmt: skip
    add_model_arguments(p, onnx=True)
    add_device(p)
    add_amp(p)
    add_image_size(p)
    p.add_argument("--host", default="127.0.0.1", help="default: %(default)s (0.0.0.0 to listen on every interface)")
    p.add_argument("--port", type=int, default=8000, help="default: %(default)s")
    p.add_argument("--max-batch", type=int, default=defaults.max_batch,
                   help="requests run as one model call at most (default: %(default)s)")  # fmt: skip
    p.add_argument("--max-wait-ms", type=float, default=defaults.max_wait_ms,
                   help="how long the first request of a batch waits for others (default: %(default)s)")  # fmt: skip
    p.add_argument("--queue-size", type=int, default=defaults.queue_size,
                   help="requests that may wait; beyond, the service answers 503 (default: %(default)s)")  # fmt: skip
    p.add_argument("--max-upload-mb", type=float, default=defaults.max_upload_bytes / 2**20,
                   help="the largest request body (default: %(default)s MiB)")  # fmt: skip
    p.add_argument("--max-pixels", type=int, default=defaults.max_pixels,
                   help="the largest image (width x height), checked before decoding (default: %(default)s)")
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    p.set_defaults(func=run)
