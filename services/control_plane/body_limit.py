"""A request body size limit (QPEFT_MAX_BODY_BYTES, 1 MiB by default) that never holds more than the limit:
a Content-Length above it is answered 413 before the body is read, and a body sent without one (chunked)
is counted as it streams and cut off with 413 at the first byte past the limit.

A route with other needs (a streamed upload) names its own limit with `@body_limit("<Settings field>")`
under its route decorator, e.g. `@body_limit("max_upload_bytes")`, or `@body_limit(None)` to count the
bytes itself; every other route has the default."""

from __future__ import annotations

import json

from starlette.exceptions import HTTPException
from starlette.routing import Match

DEFAULT = "max_body_bytes"
WITH_BODY = ("POST", "PUT", "PATCH")


def body_limit(setting: str | None):
    """Mark an endpoint with the Settings field holding its body limit (None: no limit here)."""

    def mark(endpoint):
        endpoint.body_limit_setting = setting
        return endpoint

    return mark


def _too_large(limit: int) -> str:
    return f"the request body is larger than the limit of {limit} bytes"


class BodyLimitMiddleware:
    """Pure ASGI, like LatencyMiddleware: streamed responses pass through untouched.

    The route is found before routing runs, so that an over-long Content-Length is refused before anything
    else (the API key included) is looked at. `routes` are the included routers' routes: FastAPI 0.165 keeps
    an included router as one opaque entry of the app's route list, which matches any of its paths and names
    no endpoint, so those are looked up here and the app's list serves only routes added to the app itself."""

    def __init__(self, app, fastapi_app, routes=()):
        self.app, self.fastapi_app, self.routes = app, fastapi_app, list(routes)

    def _limit(self, scope) -> int | None:
        setting = DEFAULT
        for route in (*self.routes, *self.fastapi_app.router.routes):
            endpoint = getattr(route, "endpoint", None)
            if endpoint is not None and route.matches(scope)[0] == Match.FULL:
                setting = getattr(endpoint, "body_limit_setting", DEFAULT)
                break
        return None if setting is None else getattr(self.fastapi_app.state.settings, setting)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] not in WITH_BODY:
            return await self.app(scope, receive, send)
        limit = self._limit(scope)
        if limit is None:
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            return await self._refuse(send, limit)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:  # FastAPI passes an HTTPException from the body read through: a 413
                    raise HTTPException(413, _too_large(limit))
            return message

        await self.app(scope, counted, send)

    @staticmethod
    async def _refuse(send, limit: int) -> None:
        error = {"field": "body", "message": _too_large(limit), "fix": f"send at most {limit} bytes"}
        body = json.dumps({"detail": _too_large(limit), "errors": [error]})
        # No 'connection: close': the server then discards the rest of the body as it arrives (held nowhere),
        # and a client that sends the whole body before it reads gets this answer instead of a reset.
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": body.encode()})
