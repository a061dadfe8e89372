"""chainrule's public Python package: the API schema (`chainrule.v1`) and the gRPC client.

    from chainrule import Client, NotFound

The typed errors (`chainrule.NotFound`, `InvalidArgument`, ...) are in chainrule/errors.py.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from chainrule.client import Client
    from chainrule.errors import (
        AlreadyExists,
        DeadlineExceeded,
        FailedPrecondition,
        InvalidArgument,
        NotFound,
        PermissionDenied,
        ResourceExhausted,
        ServiceError,
        Unauthenticated,
        Unavailable,
    )

__all__ = ["Client", "ServiceError", "NotFound", "AlreadyExists", "InvalidArgument",
           "FailedPrecondition", "ResourceExhausted", "PermissionDenied", "Unauthenticated",
           "Unavailable", "DeadlineExceeded"]


def __getattr__(name: str) -> Any:
    # Imported on first use: Ray workers import chainrule.v1 and need no gRPC client.
    if name == "Client":
        from chainrule.client import Client

        return Client
    if name in __all__:
        from chainrule import errors

        return getattr(errors, name)
    raise AttributeError(f"module 'chainrule' has no attribute {name!r}")
