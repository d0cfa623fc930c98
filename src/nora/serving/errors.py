"""Errors the server answers with: each names the problem and the fix, and carries its HTTP status and the
OpenAI error `type`/`code`, so clients written for the OpenAI API handle them as usual."""

from __future__ import annotations


class ServingError(Exception):
    status_code = 400
    type = "invalid_request_error"
    code: str | None = None

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class BadRequest(ServingError):
    code = "invalid_request"


class LimitExceeded(ServingError):
    code = "context_length_exceeded"


class Unauthorized(ServingError):
    status_code = 401
    type = "authentication_error"
    code = "invalid_api_key"


class Forbidden(ServingError):
    status_code = 403
    type = "permission_error"
    code = "forbidden"


class NotFound(ServingError):
    status_code = 404
    code = "model_not_found"


class Conflict(ServingError):
    status_code = 409
    code = "conflict"


class TooLarge(ServingError):
    status_code = 413
    code = "request_too_large"


class Unprocessable(ServingError):
    status_code = 422
    code = "invalid_parameters"


class Busy(ServingError):
    status_code = 503
    type = "server_error"
    code = "server_busy"


class GenerationFailed(ServingError):
    status_code = 500
    type = "server_error"
    code = "generation_failed"


class LoadFailed(ServingError):
    status_code = 500
    type = "server_error"
    code = "load_failed"
