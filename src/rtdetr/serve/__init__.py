"""The detection service (`rtdetr serve`): FastAPI + uvicorn over any `Detector`, with dynamic batching and
a web page. It stands beside `api` (it needs only the Detector interface); `cli` starts it."""

from .app import ServiceSettings, create_app

__all__ = ["ServiceSettings", "create_app"]
