"""The client's errors, typed by the server's status code.

    try:
        client.submit(spec)
    except chainrule.InvalidArgument as error:
        print(error.field, error.details())

Each is a `ServiceError`, which is a `grpc.RpcError` with the original `.code()` and
`.details()`, so code written for the plain gRPC errors keeps working.
"""

from __future__ import annotations

import re

import grpc


class ServiceError(grpc.RpcError):
    """A call the server (or the connection to it) refused: `code()` and `details()`."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(details)
        self._code, self._details = code, details
        self.original: grpc.RpcError | None = None  # the gRPC call's own error, if any

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def trailing_metadata(self) -> tuple:
        """The original call's trailing metadata (empty for an error raised here)."""
        metadata = getattr(self.original, "trailing_metadata", None)
        return (metadata() or ()) if callable(metadata) else ()

    def __str__(self) -> str:
        return f"{self._code.name}: {self._details}"


class NotFound(ServiceError):
    """No such job, data set or model (NOT_FOUND)."""


class AlreadyExists(ServiceError):
    """A name already taken, e.g. an upload's (ALREADY_EXISTS)."""


# A field path as the server puts it first in its messages: "data.batch_size: must be ...".
FIELD_PREFIX = re.compile(r"^([A-Za-z_][\w.\[\]]*): ")


class InvalidArgument(ServiceError):
    """A request the server will never accept as it is (INVALID_ARGUMENT); `field` is the
    path of the field at fault ("data.batch_size"), or "" when the message names none."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(code, details)
        match = FIELD_PREFIX.match(details)
        self.field = match.group(1) if match else ""


class FailedPrecondition(ServiceError):
    """Not in this state: deleting a running job, resuming a queued one (FAILED_PRECONDITION)."""


class ResourceExhausted(ServiceError):
    """A quota, a limit or the server's disk (RESOURCE_EXHAUSTED)."""


class PermissionDenied(ServiceError):
    """Authenticated, but not allowed (PERMISSION_DENIED)."""


class Unauthenticated(ServiceError):
    """No token, or one the server does not know (UNAUTHENTICATED)."""


class Unavailable(ServiceError):
    """No server answered at the address (UNAVAILABLE); `details()` says which address was
    tried and how to start or point at a server, `server_details` is gRPC's own message."""

    def __init__(self, code: grpc.StatusCode, details: str, address: str = ""):
        self.address, self.server_details = address, details
        if address:
            details = (f"no chainrule server answered at {address} ({details}); start one "
                       f"with `chainrule serve`, or point at one with --server or "
                       f"$CHAINRULE_SERVER")
        super().__init__(code, details)


class DeadlineExceeded(ServiceError):
    """The call's deadline passed, or a watch heard nothing for its idle timeout."""


ERRORS_BY_CODE: dict[grpc.StatusCode, type[ServiceError]] = {
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExists,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
}


def typed_error(error: grpc.RpcError, address: str = "") -> grpc.RpcError:
    """The typed error for a gRPC error (itself when already typed, or when its code has no
    type of its own: CANCELLED, INTERNAL, ...)."""
    if isinstance(error, ServiceError) or not callable(getattr(error, "code", None)):
        return error
    code, details = error.code(), error.details() or ""
    kind = ERRORS_BY_CODE.get(code)
    if kind is None:
        return error
    typed = Unavailable(code, details, address) if kind is Unavailable else kind(code, details)
    typed.original = error
    return typed
