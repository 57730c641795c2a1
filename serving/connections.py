"""The service's connections, guarded below the app (a subclass of uvicorn's h11
protocol), so that no client can hold the server by connecting and then sending
slowly or not at all.

  header     a request's header must be complete within --header_timeout seconds of
             the connection opening (or of the previous answer): idle connections and
             slowloris headers are closed (a JSON 408 if some of a header came).
  body       a body must keep arriving: no gap of --body_timeout seconds, and after the
             first --body_timeout seconds at least --min_body_kbps KiB/s on average;
             else a JSON 408 and the connection is closed. After an early answer (413,
             401, 503...) the rest of a body is read and dropped for at most
             --header_timeout seconds.
  limit      at most --max_connections open. One more arriving makes room by closing
             the connection that has waited longest for a request, if that is 2 s or
             more (none has: it is idle), with a JSON 503 and Retry-After (a client that
             was only slow to send reads that, not a reset). Else the newcomer is refused: its request
             read (body drained, so the answer is not lost to a reset), then a JSON
             503 with Retry-After and Connection: close. Beyond 64 connections being
             refused (a flood), the idlest connection of any age is closed to make
             room, or if none is idle, the newcomer is closed unanswered.
  malformed  a request h11 cannot parse gets a JSON 400 (uvicorn's own is plain text).

Every answer given here is the service's JSON error {"error": kind, "detail": ...}.
"""
import array
import fcntl
import json
import logging
import termios
import time
from dataclasses import dataclass

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("nima.serve")
TICK_S = 0.25               # how often the timeouts are checked: their precision
EVICT_AFTER_S = 2.0         # a connection waiting for less than this is not taken as idle (a busy client may take
                            # a while between connecting and sending)
REFUSE_BACKLOG = 64         # refused connections being answered at once, beyond which more are closed unanswered
DRAIN_LIMIT = 64 * 1024 * 1024   # most body bytes read and dropped before a refusal
RETRY_AFTER_S = 2           # the Retry-After of the guard's 503s
LINGER_S = 2.0              # after a 408, how long what the client still sends is read and dropped


@dataclass(frozen=True)
class ConnectionLimits:
    max_connections: int = 256
    header_timeout: float = 10.0
    body_timeout: float = 30.0
    min_body_kbps: float = 16.0

    @property
    def min_body_rate(self) -> float:
        return self.min_body_kbps * 1024


def json_answer(status: int, reason: bytes, kind: str, detail: str, retry_after: int = None) -> bytes:
    """A whole HTTP/1.1 answer that closes the connection, for the moments the app cannot
    give it (no request yet, or its body stalled)."""
    body = json.dumps({"error": kind, "detail": detail}).encode()
    head = [f"HTTP/1.1 {status} ".encode() + reason, b"content-type: application/json",
            b"content-length: %d" % len(body), b"connection: close", b"x-content-type-options: nosniff"]
    if retry_after is not None:
        head.append(b"retry-after: %d" % retry_after)
    return b"\r\n".join(head) + b"\r\n\r\n" + body


def unread_bytes(transport) -> int:
    """Bytes the kernel holds for this connection that the server has not read yet."""
    sock = transport.get_extra_info("socket")
    if sock is None:
        return 0
    count = array.array("i", [0])
    try:
        fcntl.ioctl(sock.fileno(), termios.FIONREAD, count, True)
    except OSError:
        return 0
    return count[0]


class ConnectionGuard:
    """The limits, the connections' clock (one timer for all of them) and the counts.
    `metrics` (serving.metrics.ServiceMetrics, optional) gets the closes and refusals."""

    def __init__(self, limits: ConnectionLimits, metrics=None):
        self.limits, self.metrics = limits, metrics
        self.connections = None   # uvicorn's set of open connections, seen at the first one
        self._ticking = None

    def protocol_class(self) -> type:
        """The uvicorn `http` protocol class for these limits."""
        return type("GuardedH11Protocol", (GuardedH11Protocol,), {"guard": self})

    def count(self, what: str) -> None:
        if self.metrics is not None:
            self.metrics.connections_closed.labels(what).inc()

    def open_connections(self) -> int:
        return len(self.connections) if self.connections is not None else 0

    def admit(self, new) -> None:
        """Room for `new` (just opened): within the limit, or by closing the idlest
        connection, or else `new` is refused."""
        if self.connections is None:
            self.connections = new.connections
        if self._ticking is None:
            self._ticking = new.loop.call_later(TICK_S, self._tick, new.loop)
        # Those being closed (or answered and lingering a moment before the close) no longer count.
        over = sum(not c.on_its_way_out() for c in self.connections) - self.limits.max_connections
        if over <= 0:
            return
        victim = self._idlest(new, EVICT_AFTER_S)
        if victim is None and over > REFUSE_BACKLOG:
            # A flood of connections: make room at the expense of the idlest one however
            # young (a flood's own), before closing the newcomer unanswered.
            victim = self._idlest(new, 0.0)
        if victim is not None:
            # Answered, not just closed: a client that was only slow to send its request reads a
            # JSON 503 instead of a connection reset.
            victim.close_for("evicted_idle", answer=(503, b"Service Unavailable", "busy", (
                f"the server is at --max_connections {self.limits.max_connections} and this connection had sent "
                f"no request; retry in a few seconds"), RETRY_AFTER_S))
        elif over > REFUSE_BACKLOG:
            new.close_for("refused_unanswered", answer=None)
        else:
            new.app = self._refuse

    def _idlest(self, new, min_wait: float):
        """The connection waiting longest (at least min_wait) for a request, with nothing
        unread; None if none."""
        now = time.monotonic()
        best = None
        for conn in self.connections:
            if (conn is not new and conn.waiting_for_request() and now - conn.waiting_since >= min_wait
                    and not conn.on_its_way_out() and not unread_bytes(conn.transport)
                    and (best is None or conn.waiting_since < best.waiting_since)):
                best = conn
        return best

    async def _refuse(self, scope, receive, send) -> None:
        """The app of a connection beyond the limit: read (and drop) its request's body,
        then a JSON 503 that closes the connection."""
        expects_continue = any(k == b"expect" and b"100-continue" in v.lower() for k, v in scope["headers"])
        drained = 0
        while not expects_continue:  # such a client sends its body only when told to: nothing to drain
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            drained += len(message.get("body", b""))
            if not message.get("more_body", False) or drained > DRAIN_LIMIT:
                break
        self.count("refused")
        body = json.dumps({"error": "busy", "detail": (
            f"every one of the {self.limits.max_connections} connections (--max_connections) has a request in progress; "
            "retry in a few seconds")}).encode()
        await send({"type": "http.response.start", "status": 503, "headers": [
            (b"content-type", b"application/json"), (b"content-length", b"%d" % len(body)), (b"retry-after", b"%d" % RETRY_AFTER_S),
            (b"connection", b"close"), (b"x-content-type-options", b"nosniff")]})
        await send({"type": "http.response.body", "body": body})

    def _tick(self, loop) -> None:
        self._ticking = loop.call_later(TICK_S, self._tick, loop)
        now = time.monotonic()
        for conn in list(self.connections or ()):
            if not conn.on_its_way_out():
                conn.check_timeouts(now, self.limits)


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol plus the timestamps and byte counts the guard checks."""

    guard: ConnectionGuard = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        now = time.monotonic()
        self.waiting_since = now      # waiting for a request's header since
        self.header_bytes = 0         # bytes of a header received so far
        self.body_since = now         # a body arriving since
        self.body_bytes = 0
        self.last_data = now
        self.answered_at = None       # the last answer's end, while the rest of its body is dropped
        self.lingering = False        # answered by the guard: reading and dropping until the close
        self.guard.admit(self)

    def on_its_way_out(self) -> bool:
        """Closing, or answered by the guard and lingering a moment before the close: no
        longer counted toward --max_connections, checked for timeouts or chosen to close."""
        return self.transport.is_closing() or self.lingering

    def waiting_for_request(self) -> bool:
        return self.conn.their_state is h11.IDLE and (self.cycle is None or self.cycle.response_complete)

    def data_received(self, data: bytes) -> None:
        if self.lingering:
            return
        now = time.monotonic()
        waiting = self.conn.their_state is h11.IDLE
        self.last_data = now
        if waiting:
            self.header_bytes += len(data)
        else:
            self.body_bytes += len(data)
        super().data_received(data)
        if waiting and self.conn.their_state is not h11.IDLE:  # a header is complete: its body starts
            self.body_since, self.body_bytes, self.answered_at = now, 0, None

    def on_response_complete(self) -> None:
        now = time.monotonic()
        self.waiting_since, self.header_bytes, self.answered_at = now, 0, now
        super().on_response_complete()

    def send_400_response(self, msg: str) -> None:
        """A request h11 cannot parse: the JSON error, then close (uvicorn's is plain text)."""
        self.guard.count("malformed")
        self.transport.write(json_answer(400, b"Bad Request", "malformed_request",
                                         f"{msg} (not HTTP/1.1, or a header line over the size limit)"))
        self.transport.close()

    def check_timeouts(self, now: float, limits: ConnectionLimits) -> None:
        state = self.conn.their_state
        if self.waiting_for_request():
            # Bytes waiting in the kernel came in time: only this loop is behind (a loaded machine).
            if now - self.waiting_since > limits.header_timeout and not unread_bytes(self.transport):
                partial = self.header_bytes > 0
                self.close_for("header_timeout", answer=(408, b"Request Timeout", "header_timeout", (
                    f"the request's header did not arrive within --header_timeout {limits.header_timeout:g} s"))
                    if partial else None)
        elif state is h11.SEND_BODY:
            answered = self.cycle is not None and self.cycle.response_complete
            elapsed = now - self.body_since
            stalled = now - self.last_data > limits.body_timeout
            slow = elapsed > limits.body_timeout and self.body_bytes < limits.min_body_rate * elapsed
            if answered and self.answered_at is not None and now - self.answered_at > limits.header_timeout:
                self.close_for("drain_timeout", answer=None)
            elif stalled or slow:
                started = self.cycle is not None and self.cycle.response_started
                self.close_for("body_timeout", answer=None if started else (408, b"Request Timeout", "body_timeout", (
                    f"the request body came too slowly: {self.body_bytes} bytes in {elapsed:.0f} s; it must not stall "
                    f"for --body_timeout {limits.body_timeout:g} s and, after that long, average at least "
                    f"--min_body_kbps {limits.min_body_kbps:g} KiB/s")))

    def close_for(self, why: str, answer) -> None:
        """Close this connection, first writing `answer` (status, reason, kind, detail)
        if given. A request in progress sees a disconnect, and its answer is dropped."""
        self.guard.count(why)
        if self.cycle is not None and not self.cycle.response_complete:
            self.cycle.disconnected = True
            self.cycle.message_event.set()
        if answer is None or not self.transport.can_write_eof():
            if answer is not None:
                self.transport.write(json_answer(*answer))
            self.transport.close()
            return
        # A lingering close: the answer, then the end of our side; what the client still
        # sends is read and dropped for a moment, since closing with unread bytes sends a
        # reset, which can destroy the answer before the client has read it.
        self.transport.write(json_answer(*answer))
        self.transport.write_eof()
        self.lingering = True
        self.flow.resume_reading()
        self.loop.call_later(LINGER_S, self.transport.close)
