"""OpenAI-shaped errors: `{"error": {"message", "type", "param", "code"}}`.

Handlers raise `OpenAIError` (or one of the helpers below); the exception handlers installed
by `install_exception_handlers` turn it, request-validation failures, Starlette's HTTP errors
(unknown route, wrong method) and any unexpected exception into that JSON shape, so that the
server answers every request with a body the official client can parse and keeps serving.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger(__name__)

_TYPE_BY_STATUS = {
    400: "BadRequestError",
    404: "NotFoundError",
    405: "MethodNotAllowedError",
    413: "RequestTooLargeError",
    431: "RequestHeaderFieldsTooLargeError",
    500: "InternalServerError",
    503: "ServiceUnavailableError",
}


class OpenAIError(Exception):
    """An error answered to the client with `status_code` and OpenAI's error body."""

    def __init__(self, status_code: int, message: str, *, param: str | None = None,
                 error_type: str | None = None, code: str | int | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.headers = headers
        self.status_code = status_code
        self.message = message
        self.param = param
        self.error_type = error_type or _TYPE_BY_STATUS.get(status_code, "APIError")
        self.code = code if code is not None else status_code

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.error_type, self.param, self.code)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status_code, headers=self.headers)


def error_body(message: str, error_type: str, param: str | None = None,
               code: str | int | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def bad_request(message: str, param: str | None = None) -> OpenAIError:
    return OpenAIError(400, message, param=param)


def model_not_found(model: str | None) -> OpenAIError:
    return OpenAIError(404, f"The model `{model}` does not exist.", param="model",
                       code="model_not_found")


def engine_unavailable(message: str = "The engine is not available.") -> OpenAIError:
    return OpenAIError(503, message)


def overloaded(message: str, retry_after_s: int) -> OpenAIError:
    return OpenAIError(503, message, headers={"Retry-After": str(retry_after_s)})


def internal_error(message: str = "Internal server error.") -> OpenAIError:
    return OpenAIError(500, message)


def request_too_large(limit_bytes: int) -> OpenAIError:
    return OpenAIError(413, f"Request body is larger than the limit of {limit_bytes} bytes.")


def request_header_too_large(limit_bytes: int) -> OpenAIError:
    return OpenAIError(431, f"The request line and headers are larger than the limit of {limit_bytes} bytes.")


def from_validation_error(exc: ValidationError | RequestValidationError) -> OpenAIError:
    """One 400 naming every invalid field; `param` is the first one. A field the request model does
    not declare is "Unrecognized request argument supplied: NAME" (OpenAI's words), with param NAME;
    a model validator's refusal names its field when it raised `FieldValueError` (a `param`)."""
    errors = exc.errors()
    parts: list[str] = []
    first_param: str | None = None
    for err in errors:
        loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
        if err.get("type") == "json_invalid":
            parts.append(f"Invalid JSON body: {err.get('msg', '')}")
            continue
        if not loc:
            loc = getattr((err.get("ctx") or {}).get("error"), "param", "")
        if first_param is None and loc:
            first_param = loc
        msg = err.get("msg", "invalid value")
        if err.get("type") == "extra_forbidden":
            parts.append(f"Unrecognized request argument supplied: {loc}")
        else:
            parts.append(f"{loc}: {msg}" if loc else msg)
    return bad_request("; ".join(parts) or "Invalid request.", param=first_param)


def install_exception_handlers(app: FastAPI) -> None:
    @app.exception_handler(OpenAIError)
    async def _openai_error(_: Request, exc: OpenAIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _request_validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return from_validation_error(exc).response()

    @app.exception_handler(ValidationError)
    async def _validation(_: Request, exc: ValidationError) -> JSONResponse:
        return from_validation_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        err = OpenAIError(exc.status_code, str(exc.detail))
        return JSONResponse(err.body(), status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error in %s %s", request.method, request.url.path)
        return internal_error().response()  # the log has the traceback; the client gets no internals
