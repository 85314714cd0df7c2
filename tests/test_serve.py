"""The detection service on a free loopback port: the same detections as `predict` (PyTorch, ONNX Runtime and
OpenVINO, multipart and base64 JSON, concurrent requests batched), every bad request a 4xx with the server going on,
a full queue a 503, `/v1/model` and the schema, the CLI wiring, and the web page driven in headless Chromium."""

from __future__ import annotations

import base64
import os
import shutil
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import httpx
import numpy as np
import pytest
import torch
import uvicorn
from helpers import png_declaring
from PIL import Image
from test_onnx_export import randomized_model  # the tests folder is on sys.path (pytest rootdir-relative import)

from rtdetr import RTDETR, load_detector
from rtdetr.cli import main
from rtdetr.export.onnx import export_onnx, sample_image
from rtdetr.export.openvino import export_openvino
from rtdetr.postprocess import Detections
from rtdetr.serve import ServiceSettings, create_app
from rtdetr.viz import class_color

NAMES, IDS = ["cat", "dog", "kite"], [17, 18, 38]
THRESHOLD = 0.3  # about 10 detections of the model below on the sample image
SETTINGS = ServiceSettings(max_wait_ms=50, max_upload_bytes=256 * 1024, max_pixels=4_000_000)


@pytest.fixture(scope="module")
def model() -> RTDETR:
    """A random rtdetr_tiny whose scores look like a trained model's (top scores 0.25-0.4 on the sample)."""
    model = randomized_model("rtdetr_tiny", seed=11, class_names=NAMES, category_ids=IDS).eval()
    with torch.no_grad():
        for head in model.decoder.dec_score_head:
            head.bias += 4.0
    return model


@contextmanager
def live_server(app) -> Iterator[str]:
    """`app` served by uvicorn on a free loopback port in a thread; yields its base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


@pytest.fixture(scope="module")
def server(model) -> Iterator[str]:
    with live_server(create_app(model, SETTINGS)) as url:
        yield url


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[Path]:
    """The sample JPEG, a PNG of another size and a JPEG stored sideways with EXIF 'rotate 90'."""
    folder = tmp_path_factory.mktemp("images")
    sample = Image.open(sample_image())
    paths = [Path(sample_image()), folder / "small.png", folder / "rotated.jpg"]
    sample.resize((300, 200)).save(paths[1])
    exif = Image.Exif()
    exif[0x0112] = 6
    sample.transpose(Image.Transpose.ROTATE_90).save(paths[2], exif=exif)
    return paths


def upload(path: Path, name: str | None = None) -> dict:
    return {"files": {"image": (name or path.name, path.read_bytes(), "application/octet-stream")}}


def assert_same(response: dict, expected: Detections, size: tuple[int, int]) -> None:
    """The service's JSON equals `predict`'s detections (batched and single forwards differ by float rounding)."""
    assert response["image"] == {"width": size[0], "height": size[1]}
    found = response["detections"]
    assert len(found) == len(expected) > 0
    assert [d["class_name"] for d in found] == expected.class_names
    assert [d["category_id"] for d in found] == expected.labels.tolist()
    np.testing.assert_allclose([d["box"] for d in found], expected.boxes.numpy(), atol=1e-2)
    np.testing.assert_allclose([d["score"] for d in found], expected.scores.numpy(), atol=1e-5)


def test_detect_gives_the_detections_of_predict(server, model, images):
    for path in images:
        expected = model.predict(path, score_threshold=THRESHOLD)[0]
        size = Image.open(path).size[::-1] if path.name == "rotated.jpg" else Image.open(path).size
        response = httpx.post(f"{server}/v1/detect", params={"score_threshold": THRESHOLD}, **upload(path))
        assert response.status_code == 200, response.text
        assert_same(response.json(), expected, size)
        assert set(response.json()["timing_ms"]) == {"decode", "queue", "inference", "total"}
    data = base64.b64encode(images[0].read_bytes()).decode()
    expected = model.predict(images[0], score_threshold=THRESHOLD, max_detections=5)[0]
    for image in (data, f"data:image/jpeg;base64,{data}"):
        response = httpx.post(f"{server}/v1/detect?score_threshold={THRESHOLD}&max_detections=5", json={"image": image})
        assert response.status_code == 200, response.text
        assert_same(response.json(), expected, Image.open(images[0]).size)


def test_concurrent_requests_are_batched_and_each_gets_its_own_answer(server, model, images):
    requests = [(images[i % 3], THRESHOLD + 0.02 * (i % 4)) for i in range(8)]
    start = threading.Barrier(len(requests))
    answers: list[httpx.Response | None] = [None] * len(requests)

    def send(index: int) -> None:
        path, threshold = requests[index]
        start.wait()
        answers[index] = httpx.post(f"{server}/v1/detect", params={"score_threshold": threshold}, **upload(path),
                                    timeout=60)  # fmt: skip

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(requests))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert max(a.json()["batch_size"] for a in answers) > 1, "requests arriving together share a model call"
    for (path, threshold), answer in zip(requests, answers):
        expected = model.predict(path, score_threshold=threshold)[0]
        assert_same(answer.json(), expected, (answer.json()["image"]["width"], answer.json()["image"]["height"]))


def chunked_body() -> Iterator[bytes]:
    yield b"--x\r\n"


BAD_REQUESTS = [  # (what, request arguments, status, words of the message)
    ("zero bytes", {"files": {"image": ("empty.jpg", b"", "image/jpeg")}}, 422, "empty (0 bytes)"),
    ("not an image", {"files": {"image": ("notes.jpg", b"just some text", "image/jpeg")}}, 422, "notes.jpg"),
    ("truncated", "truncated", 422, "truncated"),
    ("a decompression bomb", {"files": {"image": ("bomb.png", png_declaring(20000, 20000), "image/png")}}, 422,
     "decompression bomb"),
    ("over the size limit", {"files": {"image": ("big.bin", bytes(300 * 1024), "image/jpeg")}}, 413, "limit"),
    ("wrong content type", {"content": b"\xff\xd8\xff", "headers": {"content-type": "image/jpeg"}}, 415,
     "multipart/form-data"),
    ("no content type", {"content": b"abc"}, 415, "multipart/form-data"),
    ("unknown query parameter", "unknown parameter", 422, "unknown query parameter(s) ['threshold']"),
    ("score out of range", "bad score", 422, "less than or equal to 1"),
    ("another form field", {"files": {"picture": ("a.jpg", b"abc", "image/jpeg")}}, 400, "field 'image'"),
    ("JSON without the image", {"json": {"picture": "abc"}}, 400, "image: Field required"),
    ("JSON that is not JSON", {"content": b"{nope", "headers": {"content-type": "application/json"}}, 400,
     "JSON body"),
    ("bad base64", {"json": {"image": "not base64!"}}, 400, "not valid base64"),
    ("a base64 non-image", {"json": {"image": base64.b64encode(b"hello").decode()}}, 422, "cannot read image"),
    ("a chunked upload", {"content": chunked_body(), "headers": {"content-type": "multipart/form-data; boundary=x"}},
     411, "Content-Length"),
    ("multipart without a boundary", {"content": b"abc", "headers": {"content-type": "multipart/form-data"}}, 400,
     "Missing boundary"),
    ("two files", {"files": [("image", ("a.jpg", b"abc", "image/jpeg")), ("image", ("b.jpg", b"abc", "image/jpeg"))]},
     400, "Too many files"),
]


@pytest.mark.parametrize("what, arguments, status, message", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_a_bad_request_gets_a_4xx_with_a_message_and_the_server_goes_on(server, images, what, arguments, status,
                                                                         message):  # fmt: skip
    url = f"{server}/v1/detect"
    if arguments == "truncated":
        data = images[0].read_bytes()
        arguments = {"files": {"image": ("cut.jpg", data[: len(data) // 2], "image/jpeg")}}
    elif arguments == "unknown parameter":
        url, arguments = f"{url}?threshold=0.3", upload(images[1])
    elif arguments == "bad score":
        url, arguments = f"{url}?score_threshold=2", upload(images[1])
    response = httpx.post(url, **arguments)
    assert response.status_code == status, response.text
    detail = response.json()["detail"]
    assert message in (detail if isinstance(detail, str) else str(detail)), detail
    after = httpx.post(f"{server}/v1/detect", **upload(images[1]))
    assert after.status_code == 200 and after.json()["image"] == {"width": 300, "height": 200}


class BlockingDetector:
    """`model`'s predict, held until `release` is set; `entered` is set when a batch reaches it."""

    def __init__(self, model: RTDETR) -> None:
        self.model, self.class_names, self.category_ids = model, model.class_names, model.category_ids
        self.entered, self.release = threading.Event(), threading.Event()

    def predict(self, *args, **kwargs) -> list[Detections]:
        self.entered.set()
        assert self.release.wait(60)
        return self.model.predict(*args, **kwargs)


def test_a_full_queue_answers_503_at_once_and_the_waiting_requests_finish(model, images):
    detector = BlockingDetector(model)
    app = create_app(detector, ServiceSettings(max_batch=1, max_wait_ms=0, queue_size=2))
    with live_server(app) as url:
        answers: list[httpx.Response] = []
        send = lambda: answers.append(httpx.post(f"{url}/v1/detect", **upload(images[1]), timeout=60))  # noqa: E731
        threads = [threading.Thread(target=send)]
        threads[0].start()
        assert detector.entered.wait(30), "the first request reaches the model"
        threads += [threading.Thread(target=send) for _ in range(2)]
        for thread in threads[1:]:
            thread.start()
        deadline = time.monotonic() + 30
        while httpx.get(f"{url}/healthz").json()["queued"] < 2:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        started = time.monotonic()
        busy = httpx.post(f"{url}/v1/detect", **upload(images[1]), timeout=60)
        assert busy.status_code == 503 and "busy" in busy.json()["detail"] and busy.headers["retry-after"] == "1"
        assert time.monotonic() - started < 5, "no waiting for the queue"
        detector.release.set()
        for thread in threads:
            thread.join()
        assert [a.status_code for a in answers] == [200, 200, 200]
        assert httpx.post(f"{url}/v1/detect", **upload(images[1])).status_code == 200


def test_model_info_health_and_schema(server):
    info = httpx.get(f"{server}/v1/model").json()
    assert info == {"variant": "rtdetr_tiny", "backend": "pytorch", "input_size": [320, 320],
                    "classes": [{"category_id": i, "name": n} for i, n in zip(IDS, NAMES)]}  # fmt: skip
    assert httpx.get(f"{server}/healthz").json()["status"] == "ok"
    schema = httpx.get(f"{server}/openapi.json").json()
    detect = schema["paths"]["/v1/detect"]["post"]
    assert {p["name"] for p in detect["parameters"]} == {"score_threshold", "max_detections"}
    assert set(detect["requestBody"]["content"]) == {"multipart/form-data", "application/json"}
    assert {"413", "415", "422", "503"} <= set(detect["responses"])
    assert set(schema["components"]["schemas"]["DetectResponse"]["properties"]) >= {"detections", "image", "timing_ms"}


EXPORTS = [(export_onnx, "tiny.onnx", "onnxruntime"), (export_openvino, "tiny_ov", "openvino")]


@pytest.mark.parametrize("export, name, backend", EXPORTS, ids=[e[2] for e in EXPORTS])
def test_exported_backend(model, images, tmp_path, export, name, backend):
    detector = load_detector(export(model, tmp_path / name, check=False))  # as `rtdetr serve --weights` loads it
    with live_server(create_app(detector, SETTINGS)) as url:
        info = httpx.get(f"{url}/v1/model").json()
        assert (info["variant"], info["backend"], info["input_size"]) == ("rtdetr_tiny", backend, [320, 320])
        response = httpx.post(f"{url}/v1/detect", params={"score_threshold": THRESHOLD}, **upload(images[0]))
        assert response.status_code == 200, response.text
        assert_same(response.json(), detector.predict(images[0], THRESHOLD)[0], Image.open(images[0]).size)


def test_serve_cli_wires_the_weights_and_settings(tmp_path, model, monkeypatch, capsys):
    weights = tmp_path / "tiny.pt"
    model.save(weights)
    calls = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: calls.append((app, kwargs)))
    assert main(["serve", "--weights", str(weights), "--port", "8123", "--max-batch", "4", "--queue-size", "9"]) == 0
    ((app, kwargs),) = calls
    assert (kwargs["host"], kwargs["port"]) == ("127.0.0.1", 8123)
    assert (app.state.batcher.max_batch, app.state.batcher.queue_size) == (4, 9)
    assert app.state.batcher.detector.class_names == NAMES
    assert "http://127.0.0.1:8123/" in capsys.readouterr().out
    assert main(["serve", "--weights", str(weights), "--max-batch", "0"]) == 2
    assert "max_batch 0" in capsys.readouterr().err


def chromium() -> tuple[str, str]:
    """The paths of Debian's chromium and chromium-driver; skips only where they are not installed (CI installs
    them in .ci/run, so there a missing browser fails)."""
    browser, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if browser and driver:
        return browser, driver
    reason = "chromium and chromium-driver are not installed (apt-get install -y chromium chromium-driver)"
    if os.environ.get("CI"):
        pytest.fail(f"{reason}: .ci/run installs them")
    pytest.skip(reason)


def test_the_web_page_uploads_an_image_and_draws_the_boxes(server, model, images, tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser, driver_path = chromium()
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    # As root in a container: no sandbox; /dev/shm may be small.
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--window-size=1200,900"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        driver.get(f"{server}/")
        wait = WebDriverWait(driver, 60)
        wait.until(lambda d: "rtdetr_tiny on pytorch" in d.find_element(By.ID, "model").text)
        threshold = driver.find_element(By.ID, "threshold")
        threshold.clear()
        threshold.send_keys(str(THRESHOLD))
        driver.find_element(By.ID, "file").send_keys(str(images[0]))
        wait.until(lambda d: "detections in" in d.find_element(By.ID, "status").text)
        driver.save_screenshot(str(tmp_path / "page.png"))

        expected = model.predict(images[0], score_threshold=THRESHOLD)[0]
        width, height = Image.open(images[0]).size
        assert f"{len(expected)} detections in {width}x{height}" in driver.find_element(By.ID, "status").text
        items = [item.text for item in driver.find_elements(By.CSS_SELECTOR, "#detections li.detection")]
        assert [item.split()[0] for item in items] == expected.class_names
        assert items[0].startswith(f"{expected.class_names[0]} {expected.scores[0]:.2f}")
        canvas = driver.find_element(By.ID, "result")
        assert (int(canvas.get_attribute("width")), int(canvas.get_attribute("height"))) == (width, height)
        # The box drawn last lies on top: the middle of its left edge has the class colour of rtdetr.viz.
        x0, y0, _, y1 = expected.boxes[-1].tolist()
        pixel = driver.execute_script(
            "return Array.from(arguments[0].getContext('2d').getImageData(arguments[1], arguments[2], 1, 1).data)",
            canvas, round(x0), round((y0 + y1) / 2))  # fmt: skip
        np.testing.assert_allclose(pixel[:3], class_color(int(expected.labels[-1])), atol=40)
    finally:
        driver.quit()
    screenshot = Image.open(tmp_path / "page.png")
    assert len(np.unique(np.asarray(screenshot.convert("L")))) > 10, "a drawn page, not a blank one"
