"""The service's errors, as plain exceptions: the servicer turns each into its gRPC status.

Messages start with the field path when a field is at fault and quote the bad value, so a
client can show them as they are.
"""

from __future__ import annotations


class ServiceError(Exception):
    code = "INTERNAL"  # a grpc.StatusCode name

    def __init__(self, message: str):
        self.message = message
        super().__init__(message)


class InvalidArgument(ServiceError):
    code = "INVALID_ARGUMENT"

    def __init__(self, field_path: str, message: str):
        self.field_path = field_path
        super().__init__(f"{field_path}: {message}" if field_path else message)


class NotFound(ServiceError):
    code = "NOT_FOUND"


class AlreadyExists(ServiceError):
    code = "ALREADY_EXISTS"


class FailedPrecondition(ServiceError):
    code = "FAILED_PRECONDITION"


class Unauthenticated(ServiceError):
    code = "UNAUTHENTICATED"


class Unavailable(ServiceError):
    code = "UNAVAILABLE"
