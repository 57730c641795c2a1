"""From an HTTP request to uploads: the body read within its size limit and split into
the images sent (multipart fields named `file`, or the raw body). decoding.py turns
each into the network's input.

Nothing in a request is ever used as a path or a URL: only the bytes sent are read.
"""
from dataclasses import dataclass

from python_multipart.multipart import parse_options_header
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect

from serving.errors import ServiceError

FIELD = "file"
# Besides image/*: what generic HTTP clients send for bytes of unknown type.
RAW_TYPES = ("application/octet-stream",)
# After the limit, the rest of a too-large body is read and dropped, up to this much
# more, so the client is still reading when the 413 comes (a server that closes the
# connection on unread data makes the client's kernel discard the answer, and the
# client sees a reset instead of the reason).
DRAIN_BYTES = 64 * 1024 * 1024
HOW_TO_SEND = (f"send images as multipart/form-data fields named '{FIELD}' (curl -F {FIELD}=@photo.jpg) "
               "or one image as the body with its image/* Content-Type "
               "(curl --data-binary @photo.jpg -H 'Content-Type: image/jpeg')")


@dataclass
class Upload:
    filename: str = None
    data: bytes = None
    error_kind: str = ""     # set when the part cannot be an image at all (a text field)
    error: str = ""
    owner: object = None     # the request, whose images take their turns together (ScoringService.handle)


class BodyReader:
    """The request body as chunks, at most `limit` bytes; then ServiceError 413. With a
    `reservation` (serving.limits), the bytes are counted against the service's budget
    of uploads in flight before they are read: the Content-Length at once, a body
    without one as it arrives (ServiceError 503 when the budget stays full)."""

    def __init__(self, request, limit: int, flag: str, reservation=None):
        self.request, self.limit, self.flag = request, limit, flag
        self.reservation = reservation
        self.started = self.finished = False
        self.total = 0

    def too_large(self, size_text: str) -> ServiceError:
        return ServiceError(413, "body_too_large", f"request body is {size_text}, over the limit of "
                            f"{self.limit} bytes ({self.flag}); send fewer or smaller images per request")

    def check_declared(self) -> None:
        declared = self.request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            raise self.too_large(f"{int(declared)} bytes (Content-Length)")

    async def _received(self):
        """The body's chunks straight from the ASGI receive channel: `finished` is set as the
        last one arrives, even when the consumer stops there (a parser raising on it)."""
        self.started = True
        while not self.finished:
            message = await self.request.receive()
            if message["type"] == "http.disconnect":
                raise ClientDisconnect()
            if not message.get("more_body", False):
                self.finished = True
            if message.get("body"):
                yield message["body"]

    async def chunks(self):
        if self.reservation is not None:
            declared = self.request.headers.get("content-length")
            if declared is not None and declared.isdigit():
                await self.reservation.take(min(int(declared), self.limit))
        async for chunk in self._received():
            self.total += len(chunk)
            if self.total > self.limit:
                raise self.too_large(f"over {self.limit} bytes")
            if self.reservation is not None and self.total > self.reservation.held:
                await self.reservation.take(self.total - self.reservation.held)
            yield chunk

    async def read(self) -> bytes:
        return b"".join([chunk async for chunk in self.chunks()])

    async def discard_rest(self) -> None:
        """Read and drop what the client is still sending before an early answer (see
        DRAIN_BYTES). A client waiting on `Expect: 100-continue` sends nothing until we
        read, so then there is nothing to drop."""
        if self.finished:
            return
        if not self.started and "100-continue" in self.request.headers.get("expect", "").lower():
            return
        declared = self.request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit + DRAIN_BYTES:
            return
        try:
            async for chunk in self._received():
                self.total += len(chunk)
                if self.total > self.limit + DRAIN_BYTES:
                    return
        except ClientDisconnect:
            pass


async def read_uploads(request, body: BodyReader, max_files: int) -> list:
    """The request's images as Uploads, in request order. Raises ServiceError for a
    request that carries none (415, 400) or too much (413)."""
    content_type, params = parse_options_header(request.headers.get("content-type", ""))
    content_type = content_type.decode("latin-1").lower()
    if content_type == "multipart/form-data":
        return await _multipart(request, body, max_files)
    if content_type.startswith("image/") or content_type in RAW_TYPES:
        body.check_declared()
        data = await body.read()
        if not data:
            raise ServiceError(400, "empty_body", f"the request body is empty (Content-Type {content_type}); {HOW_TO_SEND}")
        return [Upload(filename=None, data=data)]
    got = f"Content-Type {content_type!r}" if content_type else "no Content-Type"
    raise ServiceError(415, "unsupported_media_type",
                       f"{got} is not accepted (the service never fetches URLs or opens paths sent as text); {HOW_TO_SEND}")


async def _multipart(request, body: BodyReader, max_files: int) -> list:
    body.check_declared()
    parser = MultiPartParser(request.headers, body.chunks(), max_files=max_files, max_fields=max_files)
    try:
        form = await parser.parse()
    except MultiPartException as exc:
        message = str(exc)
        if message.startswith("Too many"):
            raise ServiceError(413, "too_many_parts", f"more than {max_files} parts in one request (--max_files); "
                               "split the images over several requests") from None
        raise ServiceError(400, "malformed_multipart", f"malformed multipart/form-data body: {message} "
                           f"{HOW_TO_SEND}") from None
    try:
        parts = [(key, value) for key, value in form.multi_items()]
        uploads = []
        for key, value in parts:
            if key != FIELD:
                continue
            if isinstance(value, str):
                uploads.append(Upload(filename=None, error_kind="not_a_file", error=(
                    f"form field '{FIELD}' holds text, not a file upload: the service scores the bytes sent and "
                    f"never fetches URLs or opens paths; send the image itself (curl -F {FIELD}=@photo.jpg)")))
            else:
                uploads.append(Upload(filename=value.filename, data=await value.read()))
    finally:
        await form.close()
    if not uploads:
        names = sorted({key for key, _ in parts})
        sent = f"fields sent: {', '.join(repr(n) for n in names)}" if names else "no fields sent"
        raise ServiceError(400, "no_file_field", f"the multipart form has no field named '{FIELD}' ({sent}); {HOW_TO_SEND}")
    return uploads
