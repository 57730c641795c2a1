"""The service's budget of upload bytes in flight: every request's body is counted from
the moment it starts arriving until its images are decoded, across all requests, so a
burst of large uploads cannot take the process's memory with it. A request that does
not fit waits its turn (first come, first served) for a while, then gets a JSON 503
with Retry-After; a body without a Content-Length is counted as it arrives.
"""
import asyncio
import collections

from serving.errors import ServiceError

MIB = 1024 * 1024


class UploadBudget:
    """`limit` bytes shared by the requests being received or decoded."""

    def __init__(self, limit: int, wait_s: float):
        self.limit, self.wait_s = limit, wait_s
        self.used = 0
        self._waiters = collections.deque()   # (bytes, future) in arrival order
        self.refused = 0

    def _fits(self, n: int) -> bool:
        # A request larger than the whole budget still gets it alone (it is within
        # --max_body_mb, which the caller checks): otherwise it could never be served.
        return self.used + n <= self.limit or self.used == 0

    async def reserve(self, n: int, flag: str) -> None:
        """Count `n` more bytes, waiting up to wait_s for them (behind earlier waiters);
        raises ServiceError 503 when they do not come free in time."""
        if not self._waiters and self._fits(n):
            self.used += n
            return
        future = asyncio.get_running_loop().create_future()
        entry = (n, future)
        self._waiters.append(entry)
        try:
            await asyncio.wait_for(asyncio.shield(future), self.wait_s)
        except asyncio.TimeoutError:
            if future.done() and not future.cancelled():
                return  # granted as the wait ran out: keep it
            self._waiters.remove(entry)
            future.cancel()
            self.refused += 1
            raise ServiceError(503, "busy", f"the service is receiving or decoding {self.used / MIB:.0f} MiB of uploads, "
                               f"its limit ({flag}); retry in a few seconds", headers=retry_after(2)) from None
        except BaseException:
            # The request was cancelled while waiting: give back what was granted meanwhile.
            if entry in self._waiters:
                self._waiters.remove(entry)
            if future.done() and not future.cancelled():
                self.release(n)
            raise

    def release(self, n: int) -> None:
        self.used -= n
        while self._waiters and self._fits(self._waiters[0][0]):
            n_next, future = self._waiters.popleft()
            if future.done():
                continue
            self.used += n_next
            future.set_result(None)


def retry_after(seconds: int) -> dict:
    return {"Retry-After": str(seconds)}


class Reservation:
    """The bytes one request holds; release() gives them all back (idempotent)."""

    def __init__(self, budget: UploadBudget, flag: str):
        self.budget, self.flag = budget, flag
        self.held = 0

    async def take(self, n: int) -> None:
        if n > 0:
            await self.budget.reserve(n, self.flag)
            self.held += n

    def release(self) -> None:
        if self.held:
            self.budget.release(self.held)
            self.held = 0
