"""The service's errors: each becomes a JSON answer {"error": KIND, "detail": MESSAGE}
with its HTTP status, the message naming the bad part of the request and what would be
valid."""


class ServiceError(Exception):
    def __init__(self, status: int, kind: str, detail: str, headers: dict = None, extra: dict = None,
                 count: bool = True):
        super().__init__(detail)
        self.status, self.kind, self.detail = status, kind, detail
        self.count = count         # False when the metrics already counted it (each image's error)
        self.headers = headers or {}
        self.extra = extra or {}   # more JSON fields: the per-image results of a failed request

    def body(self) -> dict:
        return {"error": self.kind, "detail": self.detail, **self.extra}
