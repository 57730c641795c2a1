"""Dynamic batching: network inputs from concurrent requests are queued and run through
the model together, up to `max_batch` inputs or `max_wait` seconds after the oldest one
arrived, whichever comes first.

The model runs in one dedicated thread, so the event loop keeps accepting and parsing
requests while a batch is in the network; inputs that arrive meanwhile form the next
batch, which starts as soon as the network is free (their wait is already over). Other
work on the model (heat maps, enhancements: run_alone) takes its turn in the same thread.

Inputs wait in one line per owner (request), and a batch takes them in turns, one
input of each owner at a time: a request of 64 images fills the batches it shares
with a one-image request, but never ahead of it.
"""
import asyncio
import collections
import time
from concurrent.futures import ThreadPoolExecutor


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
        self._lines = None
        self._arrived = None
        self._task = None
        self._executor = None
        self._stopping = False

    async def start(self) -> None:
        self._lines = collections.OrderedDict()   # owner -> deque of (input, future, arrival time), in turn order
        self._arrived = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nima-model")
        self._task = asyncio.get_running_loop().create_task(self._run(), name="nima-batcher")

    async def stop(self) -> None:
        """Score what is queued, then end the batching task and the model thread."""
        if self._task is None:
            return
        self._stopping = True
        self._arrived.set()
        await self._task
        self._executor.shutdown(wait=True)
        self._task = None

    @property
    def pending(self) -> int:
        return sum(len(line) for line in self._lines.values()) if self._lines is not None else 0

    async def submit(self, item, owner=None):
        """Queue one input; returns its result (or raises what run_batch raised).
        `owner`: whose turn the input waits for (None: a line of its own)."""
        if self._task is None or self._stopping:
            raise BatcherStopped("the model is not running (the service is starting or shutting down)")
        future = asyncio.get_running_loop().create_future()
        key = owner if owner is not None else future
        self._lines.setdefault(key, collections.deque()).append((item, future, time.monotonic()))
        self._arrived.set()
        return await future

    async def run_alone(self, work, *args):
        """work(*args) on the model thread, in turn with the batches (the thread runs one
        thing at a time, in the order given): for the heat maps and enhancements, whose
        gradients and forward hooks must not meet another forward pass. Returns its result."""
        if self._task is None or self._stopping:
            raise BatcherStopped("the model is not running (the service is starting or shutting down)")
        return await asyncio.get_running_loop().run_in_executor(self._executor, work, *args)

    def _take(self, limit: int) -> list:
        """Up to `limit` live inputs, one per owner in turn order, round after round; an
        owner served goes to the back of the line."""
        taken = []
        while self._lines and len(taken) < limit:
            owner, line = next(iter(self._lines.items()))
            entry = line.popleft()
            if line:
                self._lines.move_to_end(owner)
            else:
                del self._lines[owner]
            if not entry[1].done():  # done: the request whose client went away has nothing to wait for
                taken.append(entry)
        return taken

    async def _next_batch(self) -> list:
        """The next batch: inputs taken in turns until it holds max_batch inputs or its
        oldest input has waited max_wait. Empty when stopping with nothing queued."""
        while not self._lines:
            if self._stopping:
                return []
            self._arrived.clear()
            await self._arrived.wait()
        batch = self._take(self.max_batch)
        if not batch:
            return []
        deadline = min(entry[2] for entry in batch) + self.max_wait_s
        while len(batch) < self.max_batch and not self._stopping:
            if not self._lines:
                timeout = deadline - time.monotonic()
                if timeout <= 0:
                    break
                self._arrived.clear()
                try:
                    await asyncio.wait_for(self._arrived.wait(), timeout)
                except asyncio.TimeoutError:
                    break
            batch += self._take(self.max_batch - len(batch))
        return batch

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._next_batch()
            if not batch:
                if self._stopping and not self._lines:
                    return
                continue
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
