"""The errors a request can end in: HTTP status, TGI's `error_type` and the user-facing message
(TGI's texts and codes; the response bodies are built in responses.py)."""

from __future__ import annotations


class RequestError(Exception):
    """A request the server refuses: HTTP `status`, TGI `error_type`, user-facing `message`.

    ``RequestError(status, error_type, message)`` for any error; the subclasses below fix the
    status and type of TGI's errors and add their message prefixes."""

    def __init__(self, status: int, error_type: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.error_type = error_type
        self.message = message

    @property
    def failure_label(self) -> str:
        """The ``err`` label of ``tgi_request_failure``."""
        return {"template_error": "template", "incomplete_generation": "incomplete",
                "incomplete_generation_stream": "incomplete"}.get(
            self.error_type, self.error_type
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.status}, {self.error_type!r}, {self.message!r})"


class InputValidationError(RequestError):
    """422 ``validation``: "Input validation error: {message}"."""

    def __init__(self, message: str) -> None:
        super().__init__(422, "validation", "Input validation error: " + message)


class TemplateError(RequestError):
    """422 ``template_error``: "Template error: {message}"."""

    def __init__(self, message: str) -> None:
        super().__init__(422, "template_error", "Template error: " + message)


class ToolError(RequestError):
    """422 ``tool_error``: "Tool error: {message}"."""

    def __init__(self, message: str) -> None:
        super().__init__(422, "tool_error", "Tool error: " + message)


class BatchSizeError(RequestError):
    """422 ``batch size exceeded`` (completions with too many prompts; no prefix, as TGI)."""

    def __init__(self, max_batch: int) -> None:
        super().__init__(
            422, "batch size exceeded",
            f"Number of prompts exceeds the maximum allowed batch size of {max_batch}",
        )


class SuffixNotSupportedError(RequestError):
    """422 ``suffix not supported`` (completions' `suffix`; no prefix, as TGI)."""

    def __init__(self) -> None:
        super().__init__(
            422, "suffix not supported",
            "Suffix is not supported and can be achieved by preprocessing the prompt.",
        )


class OverloadedError(RequestError):
    """429 ``overloaded``: "Model is overloaded"."""

    def __init__(self, message: str = "Model is overloaded") -> None:
        super().__init__(429, "overloaded", message)


class GenerationError(RequestError):
    """424 ``generation``: "Request failed during generation: {message}"."""

    def __init__(self, message: str) -> None:
        super().__init__(424, "generation", "Request failed during generation: " + message)


class IncompleteGenerationError(RequestError):
    """500 ``incomplete_generation`` (``incomplete_generation_stream`` for a stream)."""

    def __init__(self, message: str = "Incomplete generation", *, stream: bool = False) -> None:
        super().__init__(
            500, "incomplete_generation_stream" if stream else "incomplete_generation", message
        )


class UnauthorizedError(RequestError):
    """401 ``unauthorized`` (TGI answers with an empty body; the app decides)."""

    def __init__(self, message: str = "Unauthorized") -> None:
        super().__init__(401, "unauthorized", message)


class PayloadTooLargeError(RequestError):
    """413 ``payload_too_large``."""

    def __init__(self, limit: int | None = None) -> None:
        super().__init__(
            413, "payload_too_large",
            "Payload too large" if limit is None
            else f"Payload too large: the request body exceeds {limit} bytes",
        )


class NotFoundError(RequestError):
    """404 ``not_found``."""

    def __init__(self, message: str) -> None:
        super().__init__(404, "not_found", message)
