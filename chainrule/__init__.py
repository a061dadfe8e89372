"""chainrule's public Python package: the API schema (`chainrule.v1`) and the gRPC client.

    from chainrule import Client
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from chainrule.client import Client

__all__ = ["Client"]


def __getattr__(name: str) -> Any:
    # Imported on first use: Ray workers import chainrule.v1 and need no gRPC client.
    if name == "Client":
        from chainrule.client import Client

        return Client
    raise AttributeError(f"module 'chainrule' has no attribute {name!r}")
