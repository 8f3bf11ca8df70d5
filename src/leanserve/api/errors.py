"""Every error leaves as OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``.

Bad input is a 4xx with a message that says what to change; FastAPI's 422 becomes a 400, and an
unexpected exception still answers in this shape (a 500 here is a bug to fix, never a verdict on the
request).
"""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

logger = logging.getLogger(__name__)

_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable",
}


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or _TYPES.get(status, "invalid_request_error")
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> Response:
        return Response(
            json.dumps(self.body()), status_code=self.status, headers=self.headers, media_type="application/json"
        )


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def _param_of(loc: tuple[Any, ...]) -> str | None:
    # ("body", "messages", 0, "content") -> "messages[0].content"; the leading "body" is noise.
    parts = [p for p in loc if p != "body"]
    out = ""
    for p in parts:
        if isinstance(p, int):
            out += f"[{p}]"
        else:
            # Union branches show up as loc entries like "list[int]" or "function-after[...]".
            if "[" in str(p) or str(p) in {"str", "int", "float", "bool"}:
                continue
            out += f".{p}" if out else str(p)
    return out or None


def _is_type_mismatch(kind: str) -> bool:
    return kind.endswith("_type") or kind.endswith("_parsing")


def _within(param: str | None, outer: str | None) -> bool:
    return outer is None or param == outer or (param or "").startswith((f"{outer}[", f"{outer}."))


def _most_telling(errors: list[Any]) -> Any:
    """The error to report: the first one, unless a union's branches failed before it.

    A value in a union (``prompt``: a string, a list of strings, token ids...) fails every branch,
    and the type mismatches of the branches it was never meant for come first; the branch its type
    matched says what is wrong with it (a lone surrogate in ``prompt[1]``).
    """
    first = errors[0]
    if not _is_type_mismatch(first.get("type", "")):
        return first
    outer = _param_of(tuple(first.get("loc", ())))
    for e in errors[1:]:
        if not _is_type_mismatch(e.get("type", "")) and _within(_param_of(tuple(e.get("loc", ()))), outer):
            return e
    return first


def validation_error(exc: RequestValidationError) -> APIError:
    errors = exc.errors()
    if not errors:
        return bad_request("invalid request body")
    first = _most_telling(list(errors))
    kind = first.get("type", "")
    if kind == "json_invalid":
        return bad_request(f"the request body is not valid JSON: {first.get('msg')}", code="invalid_json")
    param = _param_of(tuple(first.get("loc", ())))
    if kind == "missing":
        if param is None:
            return bad_request("the request needs a JSON body", code="missing_required_parameter")
        return bad_request(f"missing required parameter: '{param}'", param=param, code="missing_required_parameter")
    code = "invalid_type" if _is_type_mismatch(kind) else "invalid_value"
    where = f"'{param}'" if param else "the request body"
    msg = str(first.get("msg", "invalid value"))
    return bad_request(f"invalid value for {where}: {msg}", param=param, code=code)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> Response:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> Response:
        return validation_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Response:
        message = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        if exc.status_code == 404:
            message = f"no route {request.method} {request.url.path}"
        return APIError(exc.status_code, message, headers=dict(exc.headers or {})).response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:
        logger.exception("unhandled error on %s %s", request.method, request.url.path)
        return APIError(500, f"internal error: {type(exc).__name__}", code="internal_error").response()
