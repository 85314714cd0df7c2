"""Dynamic batching for the service: requests that arrive close together run as one `Detector.predict` call.

    batcher = BatchQueue(detector, max_batch=8, max_wait=0.01, queue_size=64)
    await batcher.start()                      # inside the server's event loop
    detections, timing = await batcher.submit(image, score_threshold=0.5, max_detections=300)

One worker coroutine takes the oldest waiting request, waits until `max_wait` seconds after that request
arrived for others (or until `max_batch` are there), and runs the batch in one dedicated thread, so the
event loop keeps accepting requests meanwhile. The queue is bounded: `submit` on a full queue raises
`ServiceBusy` at once (the service answers 503) instead of letting requests pile up without limit.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from PIL import Image

from ..inference.detector import Detector
from ..postprocess import Detections


class ServiceBusy(Exception):
    """The request queue is full."""


@dataclass
class _Job:
    image: Image.Image
    score_threshold: float
    max_detections: int
    future: asyncio.Future
    queued_at: float = field(default_factory=time.perf_counter)


class BatchQueue:
    """A bounded queue of detection requests in front of one detector (see the module docstring).
    image_size and amp are passed to every `predict`."""

    def __init__(
        self, detector: Detector, max_batch: int = 8, max_wait: float = 0.01, queue_size: int = 64,
        image_size: tuple[int, int] | None = None, amp: str = "off",
    ) -> None:  # fmt: skip
        if max_batch < 1 or queue_size < 1 or max_wait < 0:
            raise ValueError(f"max_batch {max_batch} and queue_size {queue_size} must be >= 1, max_wait >= 0")
        self.detector, self.max_batch, self.max_wait = detector, max_batch, max_wait
        self.queue_size, self.image_size, self.amp = queue_size, image_size, amp
        self.batch_sizes: list[int] = []  # of every batch run, for /healthz and the tests
        self._queue: asyncio.Queue[_Job] | None = None
        self._arrived: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None
        self._executor: ThreadPoolExecutor | None = None

    async def start(self) -> None:
        self._queue, self._arrived = asyncio.Queue(self.queue_size), asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rtdetr-model")
        self._worker = asyncio.create_task(self._serve())

    async def stop(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            await asyncio.gather(self._worker, return_exceptions=True)
        if self._executor is not None:
            self._executor.shutdown(wait=True)
        while self._queue is not None and not self._queue.empty():
            job = self._queue.get_nowait()
            if not job.future.done():
                job.future.set_exception(ServiceBusy("the service is shutting down"))

    def depth(self) -> int:
        """Requests waiting (not counting the batch that runs)."""
        return self._queue.qsize() if self._queue is not None else 0

    async def submit(self, image: Image.Image, score_threshold: float, max_detections: int) -> tuple[Detections, dict]:
        """The detections of `image` and the request's timing in ms ('queue': waiting for its batch,
        'inference': the batch's predict) plus 'batch_size'. Raises ServiceBusy when the queue is full."""
        if self._queue is None or self._arrived is None:
            raise RuntimeError("BatchQueue.start() was not awaited (the server's lifespan starts it)")
        job = _Job(image, score_threshold, max_detections, asyncio.get_running_loop().create_future())
        try:
            self._queue.put_nowait(job)
        except asyncio.QueueFull:
            raise ServiceBusy(f"the service is busy: {self.queue_size} requests are waiting; retry shortly") from None
        self._arrived.set()
        return await job.future

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            jobs = await self._collect()
            started = time.perf_counter()
            try:
                results = await loop.run_in_executor(self._executor, self._predict, jobs)
            except Exception as error:  # the model failed on this batch: its requests fail, the service goes on
                for job in jobs:
                    if not job.future.done():
                        job.future.set_exception(error)
                continue
            inference = (time.perf_counter() - started) * 1000
            self.batch_sizes.append(len(jobs))
            for job, detections in zip(jobs, results):
                if not job.future.done():  # a client that went away cancelled its future
                    timing = {"queue": (started - job.queued_at) * 1000, "inference": inference}
                    job.future.set_result((detections, {**timing, "batch_size": len(jobs)}))

    async def _collect(self) -> list[_Job]:
        """The next batch: the oldest request and those that arrive until `max_wait` after it (at most
        `max_batch`), less the requests whose clients went away."""
        assert self._queue is not None and self._arrived is not None
        while True:
            jobs = [await self._queue.get()]
            deadline = jobs[0].queued_at + self.max_wait
            while len(jobs) < self.max_batch:
                if not self._queue.empty():
                    jobs.append(self._queue.get_nowait())
                    continue
                remaining = deadline - time.perf_counter()
                if remaining <= 0:
                    break
                self._arrived.clear()
                try:  # an Event, not Queue.get, under the timeout: a timed-out get could drop a request
                    await asyncio.wait_for(self._arrived.wait(), remaining)
                except asyncio.TimeoutError:
                    break
            live = [job for job in jobs if not job.future.done()]
            if live:
                return live

    def _predict(self, jobs: list[_Job]) -> list[Detections]:
        """One predict for the batch at the loosest of its settings, then each request's own: detections are
        sorted by score, so 'above t, first m' of the loosest result equals a predict at (t, m)."""
        lowest = min(job.score_threshold for job in jobs)
        most = max(job.max_detections for job in jobs)
        images = [job.image for job in jobs]
        results = self.detector.predict(images, lowest, self.image_size, len(jobs), most, amp=self.amp)
        return [_limited(d, job.score_threshold, job.max_detections) for d, job in zip(results, jobs)]


def _limited(detections: Detections, score_threshold: float, max_detections: int) -> Detections:
    keep = (detections.scores > score_threshold).nonzero().flatten()[:max_detections]
    names = [detections.class_names[i] for i in keep.tolist()]
    return Detections(detections.boxes[keep], detections.scores[keep], detections.labels[keep], names)
