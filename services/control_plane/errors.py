"""Errors at the edge: every 4xx says which field is wrong and how to fix it."""

from __future__ import annotations

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

# Fixes by pydantic error type; the message itself says what was wrong.
FIXES = {
    "missing": "add this field",
    "extra_forbidden": "remove this field (see the schema at /docs for the allowed ones)",
    "json_invalid": "send valid JSON",
    "model_attributes_type": "send a JSON object",
    "dict_type": "send a JSON object",
    "list_type": "send a JSON array",
    "string_type": "send a string",
    "int_type": "send an integer",
    "int_parsing": "send an integer",
    "float_type": "send a number",
    "float_parsing": "send a number",
    "bool_type": "send true or false",
    "bool_parsing": "send true or false",
    "literal_error": "use one of the values listed in the message",
    "enum": "use one of the values listed in the message",
}


class ApiError(Exception):
    def __init__(self, status: int, detail: str, field: str | None = None, fix: str | None = None, **extra):
        self.status, self.detail, self.field, self.fix, self.extra = status, detail, field, fix, extra


def _loc(loc) -> str:
    return ".".join(str(p) for p in loc)


def _split_field(msg: str, loc: tuple) -> tuple[str, str]:
    """Model-level checks start their message with the field they are about ('shots: ...'): move it into the
    location, so that it reads body.shots rather than body."""
    head, sep, rest = msg.partition(": ")
    if sep and head.replace(".", "").replace("_", "").isalnum() and " " not in head:
        return _loc((*loc, head)), rest
    return _loc(loc), msg


def _fix(err: dict) -> str:
    kind, ctx = err.get("type", ""), err.get("ctx") or {}
    if ctx.get("fix"):
        return str(ctx["fix"])
    if kind.startswith(("greater_than", "less_than")) or kind in ("too_short", "too_long"):
        bounds = ", ".join(
            f"{k} {v}" for k, v in ctx.items() if k in ("gt", "ge", "lt", "le", "min_length", "max_length")
        )
        return f"use a value within the bounds ({bounds})" if bounds else "use a value within the bounds"
    if kind in FIXES:
        return FIXES[kind]
    return "see the message; the request schema is at /docs"


async def validation_handler(_request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = []
    for err in exc.errors():
        loc = tuple(p for p in err.get("loc", ()) if p != "__root__")
        msg = str(err.get("msg", "invalid value"))
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        field, msg = _split_field(msg, loc)
        errors.append({"field": field, "message": msg, "fix": _fix(err)})
    detail = "; ".join(f"{e['field']}: {e['message']}" for e in errors)
    return JSONResponse(status_code=422, content={"detail": detail, "errors": errors})


async def api_error_handler(_request: Request, exc: ApiError) -> JSONResponse:
    err = {"field": exc.field, "message": exc.detail, "fix": exc.fix}
    return JSONResponse(status_code=exc.status, content={"detail": exc.detail, "errors": [err], **exc.extra})


async def http_error_handler(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """Routing errors (unknown path, wrong method) and HTTPExceptions raised by FastAPI itself."""
    if exc.status_code == 404:
        field, fix = "path", "check the URL; the API's routes are listed at /docs"
    elif exc.status_code == 405:
        field, fix = "method", f"{request.method} is not allowed here; the allowed methods are listed at /docs"
    elif exc.status_code == 413:
        field, fix = "body", "send a smaller body; the message gives the limit"
    elif exc.status_code in (401, 403):
        field, fix = "header.X-API-Key", "send a valid API key in X-API-Key or Authorization: Bearer"
    else:
        field, fix = None, "see /docs"
    err = {"field": field, "message": str(exc.detail), "fix": fix}
    return JSONResponse(
        status_code=exc.status_code, content={"detail": str(exc.detail), "errors": [err]}, headers=exc.headers
    )
