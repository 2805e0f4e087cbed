"""Server-side batching: requests' prepared images -> one forward pass per batch -> each request's row.

    submit(image) -> queue -> [up to max_batch images, waiting at most max_wait after the first]
        -> Classifier.probabilities in one inference thread -> each request's future gets its row

Images are decoded and checked before they are submitted (in the request's own thread), so a bad
upload fails its own request and never reaches a batch; a batch holds only images that decoded.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import torch

from trainer.infer import Classifier


class Batcher:
    def __init__(self, classifier: Classifier, max_batch: int = 16, max_wait: float = 0.005) -> None:
        self.classifier = classifier
        self.max_batch = max_batch
        self.max_wait = max_wait
        self.queue: asyncio.Queue[tuple[torch.Tensor, asyncio.Future[torch.Tensor]]] = asyncio.Queue()
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="inference")  # one forward pass at a time
        self.task: asyncio.Task[None] | None = None
        self.batches = 0  # forward passes run, for /info and the tests

    def start(self) -> None:
        self.task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self.task:
            self.task.cancel()
        self.executor.shutdown(wait=False, cancel_futures=True)

    async def submit(self, image: torch.Tensor) -> torch.Tensor:
        """uint8 3 x S x S (Classifier.prepare) -> this image's probabilities."""
        future: asyncio.Future[torch.Tensor] = asyncio.get_running_loop().create_future()
        await self.queue.put((image, future))
        return await future

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            items = [await self.queue.get()]
            deadline = loop.time() + self.max_wait
            while len(items) < self.max_batch and (left := deadline - loop.time()) > 0:
                try:
                    items.append(await asyncio.wait_for(self.queue.get(), left))
                except asyncio.TimeoutError:
                    break
            images = torch.stack([image for image, _ in items])
            try:
                probs = await loop.run_in_executor(self.executor, self.classifier.probabilities, images)
            except RuntimeError as error:  # the model itself failed: every request of the batch is told
                for _, future in items:
                    if not future.done():
                        future.set_exception(error)
                continue
            self.batches += 1
            for (_, future), row in zip(items, probs):
                if not future.done():  # a client that went away cancelled its future
                    future.set_result(row)
