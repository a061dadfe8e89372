"""The service's errors, as plain exceptions: the servicer turns each into its gRPC status.

Messages start with the field path when a field is at fault and quote the bad value, so a
client can show them as they are. A full disk is not the caller's fault but is theirs to know:
`disk_full` recognises it wherever it was raised, for RESOURCE_EXHAUSTED.
"""

from __future__ import annotations

import errno
import sqlite3


class ServiceError(Exception):
    code = "INTERNAL"  # a grpc.StatusCode name

    def __init__(self, message: str):
        self.message = message
        super().__init__(message)


class InvalidArgument(ServiceError):
    code = "INVALID_ARGUMENT"

    def __init__(self, field_path: str, message: str):
        self.field_path = field_path
        self.detail = message  # without the field path
        super().__init__(f"{field_path}: {message}" if field_path else message)


class NotFound(ServiceError):
    code = "NOT_FOUND"


class AlreadyExists(ServiceError):
    code = "ALREADY_EXISTS"


class FailedPrecondition(ServiceError):
    code = "FAILED_PRECONDITION"


class Unauthenticated(ServiceError):
    code = "UNAUTHENTICATED"


class PermissionDenied(ServiceError):
    code = "PERMISSION_DENIED"


class ResourceExhausted(ServiceError):
    code = "RESOURCE_EXHAUSTED"


class DeadlineExceeded(ServiceError):
    code = "DEADLINE_EXCEEDED"


DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
DISK_FULL_MESSAGE = ("the server is out of disk space for its data folder; nothing was stored. "
                     "Retry later, or ask the server's operator to free space (or raise the "
                     "quota) where it keeps its data")


def disk_full(error: BaseException) -> ResourceExhausted | None:
    """The error a caller should see when `error` (from any depth of a request) means the
    server's disk is full: an OSError ENOSPC/EDQUOT/EFBIG, or SQLite's SQLITE_FULL. The raw
    text names server paths and means nothing to a caller; the operator gets it in the log."""
    seen: set[int] = set()
    cause: BaseException | None = error
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, OSError) and cause.errno in DISK_FULL_ERRNOS:
            return ResourceExhausted(DISK_FULL_MESSAGE)
        if isinstance(cause, sqlite3.Error) and (
                getattr(cause, "sqlite_errorname", "") == "SQLITE_FULL"
                or "database or disk is full" in str(cause)):
            return ResourceExhausted(DISK_FULL_MESSAGE)
        cause = cause.__cause__ or cause.__context__
    return None
