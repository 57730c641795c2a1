"""Dynamic batching: network inputs from concurrent requests are queued and run through
the model together, up to `max_batch` inputs or `max_wait` seconds after the oldest one
arrived, whichever comes first.

The model runs in one dedicated thread, so the event loop keeps accepting and parsing
requests while a batch is in the network; inputs that arrive meanwhile form the next
batch, which starts as soon as the network is free (their wait is already over). Other
work on the model (heat maps, enhancements: run_alone) takes its turn in the same thread.
"""
import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

_STOP = object()


class BatcherStopped(RuntimeError):
    """submit() after stop(): the service is shutting down."""


class DynamicBatcher:
    def __init__(self, run_batch, max_batch: int, max_wait_s: float, on_batch=None):
        """run_batch(list of inputs) -> list of results in the same order, called in the
        model thread. on_batch(size, seconds), if given, is called after each batch (the
        metrics)."""
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if max_wait_s < 0:
            raise ValueError(f"max_wait must be >= 0, got {max_wait_s}")
        self.run_batch, self.max_batch, self.max_wait_s, self.on_batch = run_batch, max_batch, max_wait_s, on_batch
        self._queue = None
        self._task = None
        self._executor = None
        self._stopping = False

    async def start(self) -> None:
        self._queue = asyncio.Queue()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nima-model")
        self._task = asyncio.get_running_loop().create_task(self._run(), name="nima-batcher")

    async def stop(self) -> None:
        """Score what is queued, then end the batching task and the model thread."""
        if self._task is None:
            return
        self._stopping = True
        self._queue.put_nowait(_STOP)
        await self._task
        self._executor.shutdown(wait=True)
        self._task = None

    @property
    def pending(self) -> int:
        return self._queue.qsize() if self._queue is not None else 0

    async def submit(self, item):
        """Queue one input; returns its result (or raises what run_batch raised)."""
        if self._task is None or self._stopping:
            raise BatcherStopped("the model is not running (the service is starting or shutting down)")
        future = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((item, future, time.monotonic()))
        return await future

    async def run_alone(self, work, *args):
        """work(*args) on the model thread, in turn with the batches (the thread runs one
        thing at a time, in the order given): for the heat maps and enhancements, whose
        gradients and forward hooks must not meet another forward pass. Returns its result."""
        if self._task is None or self._stopping:
            raise BatcherStopped("the model is not running (the service is starting or shutting down)")
        return await asyncio.get_running_loop().run_in_executor(self._executor, work, *args)

    async def _next_batch(self, first) -> tuple:
        """(batch, stop seen) starting with `first`, filled from the queue until it holds
        max_batch inputs or the oldest input has waited max_wait."""
        batch, deadline = [first], first[2] + self.max_wait_s
        while len(batch) < self.max_batch:
            try:
                item = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                timeout = deadline - time.monotonic()
                if timeout <= 0:
                    break
                try:
                    item = await asyncio.wait_for(self._queue.get(), timeout)
                except asyncio.TimeoutError:
                    break
            if item is _STOP:
                return batch, True
            batch.append(item)
        return batch, False

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        stop = False
        while not stop:
            first = await self._queue.get()
            if first is _STOP:
                break
            batch, stop = await self._next_batch(first)
            # A request whose client went away has nothing to wait for.
            live = [entry for entry in batch if not entry[1].done()]
            if not live:
                continue
            started = time.perf_counter()
            try:
                results = await loop.run_in_executor(self._executor, self.run_batch, [entry[0] for entry in live])
            except Exception as exc:  # noqa: BLE001 - handed to every waiting request, the loop goes on
                for _, future, _ in live:
                    if not future.done():
                        future.set_exception(exc)
                continue
            if self.on_batch is not None:
                self.on_batch(len(live), time.perf_counter() - started)
            for (_, future, _), result in zip(live, results):
                if not future.done():
                    future.set_result(result)
