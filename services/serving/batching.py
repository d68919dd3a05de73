"""Adaptive batching: concurrent requests for one model version share one prediction.

While a batch is computing on a worker thread, new requests queue; when it ends,
everything queued (up to max_rows) becomes the next batch. At low load a request
goes alone and waits for nothing; under load the batches grow by themselves,
and a transform and a predict are paid once per batch instead of once per
request. `max_wait` (0 by default) can add a short wait before a batch that is
not yet full, trading latency for larger batches.

One request's rows are never split across batches, and a request larger than
max_rows runs alone. A batch that fails is retried one request at a time, so
one caller's bad luck never fails another's request.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import numpy as np

Outputs = dict[str, np.ndarray]
Rows = dict[str, np.ndarray]  # one request's rows, by column
# Row-indexed outputs (the same for every row, like the class list, are not split).
PER_BATCH_OUTPUTS = ("classes",)


@dataclass
class _Pending:
    rows: Rows
    count: int
    future: asyncio.Future[Outputs]


class Batcher:
    def __init__(
        self,
        compute: Callable[[list[Rows]], Awaitable[Outputs]],
        max_rows: int,
        max_wait: float,
        on_batch: Callable[[int], None] = lambda rows: None,
    ):
        self._compute = compute
        self.max_rows = max_rows
        self.max_wait = max_wait
        self._on_batch = on_batch
        self._queue: deque[_Pending] = deque()
        self._queued_rows = 0
        self._worker: asyncio.Task[None] | None = None

    async def predict(self, rows: Rows, count: int) -> Outputs:
        """The outputs for one request's `count` rows, computed with whatever else is queued."""
        future: asyncio.Future[Outputs] = asyncio.get_running_loop().create_future()
        self._queue.append(_Pending(rows, count, future))
        self._queued_rows += count
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._drain())
        return await future

    def _take(self) -> list[_Pending]:
        batch = [self._queue.popleft()]
        rows = batch[0].count
        while self._queue and rows + self._queue[0].count <= self.max_rows:
            item = self._queue.popleft()
            batch.append(item)
            rows += item.count
        self._queued_rows -= rows
        # Callers that went away (a deadline, a cancel) need no rows computed.
        return [item for item in batch if not item.future.done()]

    async def _drain(self) -> None:
        while self._queue:
            if self.max_wait > 0 and self._queued_rows < self.max_rows:
                await asyncio.sleep(self.max_wait)
            batch = self._take()
            if batch:
                await self._run(batch)

    async def _run(self, batch: list[_Pending]) -> None:
        try:
            # The requests' rows are joined where the prediction runs: off the event loop.
            outputs = await self._compute([item.rows for item in batch])
        except Exception as exc:  # noqa: BLE001 - handed to the callers below
            if len(batch) == 1:
                if not batch[0].future.done():
                    batch[0].future.set_exception(exc)
                return
            for item in batch:  # alone, each request gets its own result or its own error
                await self._run([item])
            return
        self._on_batch(sum(item.count for item in batch))
        start = 0
        for item in batch:
            stop = start + item.count
            if not item.future.done():
                item.future.set_result(
                    {
                        name: values if name in PER_BATCH_OUTPUTS else values[start:stop]
                        for name, values in outputs.items()
                    }
                )
            start = stop
