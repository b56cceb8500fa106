"""The one exception hierarchy. Each subclass carries its HTTP status and OpenAI error type and code;
`api/errors.py` turns them into response bodies."""

from __future__ import annotations


class MlxpoolError(Exception):
    status = 500
    type = "server_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, retry_after: float | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.retry_after = retry_after


class InvalidRequestError(MlxpoolError):
    status = 400
    type = "invalid_request_error"


class ContextLengthError(InvalidRequestError):
    code = "context_length_exceeded"


class InvalidImageError(InvalidRequestError):
    """An image (or document) that cannot be fetched, is too large, or does not decode."""

    code = "invalid_image"


class InvalidAudioError(InvalidRequestError):
    """An audio file that is empty, not a readable container, has no audio stream, or decodes to nothing."""

    code = "invalid_audio"


class ModelNotFoundError(MlxpoolError):
    status = 404
    type = "invalid_request_error"
    code = "model_not_found"


class UnsupportedKindError(InvalidRequestError):
    """The model exists but cannot serve this route (an ASR model asked for embeddings)."""

    code = "model_not_supported"


class RequestTooLargeError(MlxpoolError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class ServiceUnavailableError(MlxpoolError):
    """Memory or a model cannot be had in time; the client should retry after `retry_after` seconds."""

    status = 503
    type = "server_error"
    code = "service_unavailable"

    def __init__(self, message: str, *, retry_after: float = 5.0, param: str | None = None):
        super().__init__(message, param=param, retry_after=retry_after)


class ModelLoadError(ServiceUnavailableError):
    code = "model_load_failed"


class MemoryBudgetError(ServiceUnavailableError):
    """Memory could not be freed in time; a later try may succeed."""

    code = "memory_budget_exceeded"


class ModelTooLargeError(ServiceUnavailableError):
    """The model's estimate exceeds the whole budget: it cannot load until the budget is raised."""

    code = "model_too_large"


class GenerationError(MlxpoolError):
    """A model step failed while producing this request's output (500; the server and other models go on)."""

    code = "generation_failed"


class RepoNotFoundError(MlxpoolError):
    """The model's repo does not exist on the hub (or is private and no token can see it)."""

    status = 404
    type = "invalid_request_error"
    code = "repo_not_found"


class HubAuthError(ServiceUnavailableError):
    """The repo is gated or needs a token the server does not have (HF_TOKEN)."""

    code = "hub_unauthorized"


class HubUnreachableError(ServiceUnavailableError):
    code = "hub_unreachable"


class DiskFullError(ServiceUnavailableError):
    code = "disk_full"


class NotDownloadedError(ServiceUnavailableError):
    """The model is not on disk and its automatic download is switched off."""

    code = "model_not_downloaded"


class ConfigError(Exception):
    """A configuration file that cannot be used; the message names the file, model and field."""
