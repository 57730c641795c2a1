"""Worker processes for the service's decoding: each runs one job at a time, jobs wait in
one queue per request and are served round-robin, and a job that overruns its deadline
has its process killed and replaced, the others going on undisturbed.

Why not concurrent.futures.ProcessPoolExecutor: it cannot end one worker (a stuck job
could only be stopped by breaking the whole pool, failing every job in it), and its one
first-come-first-served queue lets a request with 64 large images hold every decoder
while a one-image request waits behind them.

Processes start from a fork server that imported the decoding code once, so a
replacement is ready in a fraction of a second instead of the seconds a fresh
interpreter needs to import torch; the fork server has started no threads, so forking
it is safe (forking the service itself, whose torch runs threads, is not).
"""
import asyncio
import collections
import logging
import multiprocessing
import signal
from concurrent.futures import ThreadPoolExecutor

log = logging.getLogger("nima.serve")
START_TIMEOUT_S = 120    # a worker's start: the fork, then its initializer
KILL_GRACE_S = 2.0       # past the deadline before the process is killed: the decode's own deadline answers first


class JobTimeout(Exception):
    """The job ran past the deadline; its process was replaced."""


class WorkerDied(Exception):
    """The process died on the job, twice (two processes): the job kills its decoder."""


class PoolStopped(RuntimeError):
    """run() before start() or after stop(): the service is starting or shutting down."""


def _serve(conn, initializer, initargs) -> None:
    """A worker's life: initialise, say ready, then answer fn(payload, *args) for each
    job, which comes as (fn, args), then the payload's bytes (not pickled: no copy)."""
    # The parent decides when workers end: Ctrl-C reaches the whole process group, and
    # some supervisors signal every process; requests still being answered during a
    # graceful shutdown need their decoders.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if initializer is not None:
        initializer(*initargs)
    conn.send("ready")
    while True:
        try:
            fn, args = conn.recv()
            payload = conn.recv_bytes()
        except EOFError:  # the parent closed its end: the pool is stopping
            return
        conn.send(fn(payload, *args))


class _Worker:
    """One process and the parent's end of its pipe. Used from one thread at a time."""

    def __init__(self, ctx, target_args):
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_serve, args=(child, *target_args), daemon=True, name="nima-decoder")
        self.proc.start()
        child.close()
        if not self.conn.poll(START_TIMEOUT_S) or self.conn.recv() != "ready":
            self.kill()
            raise RuntimeError(f"a decoding process did not start within {START_TIMEOUT_S} s")

    def kill(self) -> None:
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join()
        self.conn.close()

    def stop(self) -> None:
        self.conn.close()  # the worker's recv sees EOF and returns
        self.proc.join(5)
        if self.proc.is_alive():
            self.kill()


class _Job:
    __slots__ = ("fn", "payload", "args", "future")

    def __init__(self, fn, payload: bytes, args: tuple, future):
        self.fn, self.payload, self.args, self.future = fn, payload, args, future


class FairProcessPool:
    """`size` processes computing fn(payload bytes, *args) -> a picklable result, fn a
    top-level function.

    run(owner, fn, payload, *args): jobs of one owner (a request) run in order; owners
    take turns, one job each. deadline_s (0: none) + KILL_GRACE_S: the longest a job may
    run before its process is killed and replaced (JobTimeout). on_replace(), if given,
    is called (in a pool thread) for each process replaced."""

    def __init__(self, size: int, deadline_s: float, initializer=None, initargs=(), preload=(), on_replace=None):
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        self.size, self.deadline_s = size, deadline_s
        self._ctx = multiprocessing.get_context("forkserver")
        self._ctx.set_forkserver_preload(list(preload))
        self._target_args = (initializer, initargs)
        self._workers = []
        self._threads = None
        self._queues = collections.OrderedDict()   # owner -> deque of _Job, in turn order
        self._wakeup = None
        self._dispatchers = []
        self._stopping = False
        self.replaced = 0      # processes replaced (timed out or died)
        self.on_replace = on_replace

    @property
    def queued(self) -> int:
        return sum(len(jobs) for jobs in self._queues.values())

    def pids(self) -> list:
        return [w.proc.pid for w in self._workers]

    async def start(self) -> None:
        """Start every process now (not on the first requests)."""
        loop = asyncio.get_running_loop()
        self._threads = ThreadPoolExecutor(self.size, thread_name_prefix="nima-decoder")
        self._wakeup = asyncio.Event()
        self._workers = list(await asyncio.gather(*(loop.run_in_executor(self._threads, _Worker, self._ctx, self._target_args)
                                                    for _ in range(self.size))))
        self._dispatchers = [loop.create_task(self._dispatch(i), name=f"nima-decoder-{i}") for i in range(self.size)]

    async def stop(self) -> None:
        """Let the jobs running finish, drop the queued ones, end the processes."""
        self._stopping = True
        for jobs in self._queues.values():
            for job in jobs:
                if not job.future.done():
                    job.future.cancel()
        self._queues.clear()
        if self._wakeup is not None:
            self._wakeup.set()
        await asyncio.gather(*self._dispatchers, return_exceptions=True)
        for worker in self._workers:
            worker.stop()
        if self._threads is not None:
            self._threads.shutdown(wait=True)

    async def run(self, owner, fn, payload: bytes, *args):
        """fn(payload, *args) in a worker, after the jobs queued before it in its owner's
        turn. `owner`: any hashable (None: a line of its own)."""
        if self._stopping or not self._dispatchers:
            raise PoolStopped("the decoding processes are not running (the service is starting or shutting down)")
        future = asyncio.get_running_loop().create_future()
        key = owner if owner is not None else future
        self._queues.setdefault(key, collections.deque()).append(_Job(fn, payload, args, future))
        self._wakeup.set()
        return await future

    async def _next_job(self):
        """The next job in turn (None when stopping): the first owner's oldest job, and
        that owner goes to the back of the line."""
        while not self._stopping:
            while self._queues:
                owner, jobs = next(iter(self._queues.items()))
                job = jobs.popleft()
                if jobs:
                    self._queues.move_to_end(owner)
                else:
                    del self._queues[owner]
                if not job.future.done():  # done: cancelled, its request is gone
                    return job
            self._wakeup.clear()
            await self._wakeup.wait()
        return None

    async def _dispatch(self, index: int) -> None:
        loop = asyncio.get_running_loop()
        while True:
            job = await self._next_job()
            if job is None:
                return
            try:
                result = await loop.run_in_executor(self._threads, self._call, index, job)
            except Exception as exc:  # noqa: BLE001 - the job's outcome, handed to its request
                if not job.future.done():
                    job.future.set_exception(exc)
            else:
                if not job.future.done():
                    job.future.set_result(result)

    def _replace(self, index: int, why: str) -> None:
        self._workers[index].kill()
        self.replaced += 1
        if self.on_replace is not None:
            self.on_replace()
        log.error("a decoding process %s; starting a new one", why)
        self._workers[index] = _Worker(self._ctx, self._target_args)

    def _call(self, index: int, job: _Job):
        """In a pool thread: the job on worker `index`, replacing that process if it dies
        or overruns the deadline."""
        for attempt in (1, 2):
            worker = self._workers[index]
            try:
                worker.conn.send((job.fn, job.args))
                worker.conn.send_bytes(job.payload)
            except OSError:  # dead before the job was handed over (killed from outside): not this job's doing
                self._replace(index, "died")
                continue
            if not worker.conn.poll(self.deadline_s + KILL_GRACE_S if self.deadline_s else None):
                self._replace(index, f"overran the {self.deadline_s:g} s decode deadline")
                raise JobTimeout(self.deadline_s)
            try:
                return worker.conn.recv()
            except (EOFError, OSError):
                # Died on the job: a decoder crash, or killed for memory or from outside.
                # Once more on a new process; a job that kills that one too is the cause.
                self._replace(index, "died")
        raise WorkerDied()
