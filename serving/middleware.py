"""ASGI middleware of the service."""


class NoSniff:
    """ASGI middleware: every answer says X-Content-Type-Options: nosniff, so that no
    browser reads a JSON error as HTML or script."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def nosniff_send(message):
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                if not any(k.lower() == b"x-content-type-options" for k, _ in headers):
                    message = {**message, "headers": headers + [(b"x-content-type-options", b"nosniff")]}
            await send(message)

        await self.app(scope, receive, nosniff_send)
