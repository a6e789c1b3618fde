"""Errors the HTTP layer answers in OpenAI's shape: `{"error": {message, type, param, code}}`.

`OpenAIError` is raised inside the ingress and also passed *as a value* from an engine replica
to the ingress (the first item of a replica's stream), so no exception has to cross Ray.
"""

from __future__ import annotations

from http import HTTPStatus

from pydantic import ValidationError


class OpenAIError(Exception):
    """An error with the HTTP status and the fields of OpenAI's error object."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def __reduce__(self):  # keep every field when pickled across Ray
        return type(self), (self.status, self.message, self.type, self.param, self.code)

    def to_dict(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


def bad_request(message: str, param: str | None = None) -> OpenAIError:
    return OpenAIError(HTTPStatus.BAD_REQUEST, message, param=param)


def from_validation_error(error: ValidationError) -> OpenAIError:
    """A 400 naming the first bad field of a request body."""
    first = error.errors()[0]
    param = ".".join(str(part) for part in first["loc"]) or None
    if first["type"] == "extra_forbidden":  # OpenAI's own words for a field it does not know
        return bad_request(f"Unrecognized request argument supplied: {param}", param=param)
    message = first["msg"].removeprefix("Value error, ")
    return bad_request(f"{param}: {message}" if param else message, param=param)


def unauthorized() -> OpenAIError:
    return OpenAIError(
        HTTPStatus.UNAUTHORIZED,
        "Missing or invalid API key; send 'Authorization: Bearer <key>'.",
        code="invalid_api_key",
    )


def model_not_found(model: str) -> OpenAIError:
    return OpenAIError(
        HTTPStatus.NOT_FOUND,
        f"The model '{model}' does not exist.",
        param="model",
        code="model_not_found",
    )


def queue_full(num_waiting: int, max_num_waiting: int) -> OpenAIError:
    return queue_full_message(f"{num_waiting} requests are waiting (limit {max_num_waiting})")


def queue_full_message(detail: str) -> OpenAIError:
    return OpenAIError(
        HTTPStatus.TOO_MANY_REQUESTS,
        f"The server is overloaded: {detail}; retry later.",
        type="rate_limit_error",
        code="queue_full",
    )


def engine_dead() -> OpenAIError:
    return OpenAIError(
        HTTPStatus.SERVICE_UNAVAILABLE,
        "The engine is not running.",
        type="server_error",
        code="engine_dead",
    )


def kv_transfer_failed(detail: str) -> OpenAIError:
    """A P/D request whose prompt KV could not be computed or read, under the "fail" policy."""
    return OpenAIError(
        HTTPStatus.SERVICE_UNAVAILABLE,
        f"The prompt's KV cache could not be transferred ({detail}); retry the request.",
        type="server_error",
        code="kv_transfer_failed",
    )


def internal_error(error: BaseException) -> OpenAIError:
    return OpenAIError(
        HTTPStatus.INTERNAL_SERVER_ERROR,
        f"Internal error: {type(error).__name__}: {error}",
        type="server_error",
    )
