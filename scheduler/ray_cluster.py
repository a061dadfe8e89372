"""Where jobs run: an embedded Ray instance on this machine, or an existing cluster by address.

Token authentication stays on (Ray's default for local instances); joining an existing cluster
needs RAY_AUTH_MODE=token in the environment, as the cluster's own processes have.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import ray


class RayTokenMissing(RuntimeError):
    """Joining a cluster needs its auth token, and this process has none (or a wrong one)."""


def token_hint(address: str) -> str:
    """One line on where the cluster's token goes, for a user whose join failed."""
    return (f"the Ray cluster at {address} uses token authentication: run with "
            f"RAY_AUTH_MODE=token and put the cluster's token (the head node's "
            f"~/.ray/auth_token) in {Path.home() / '.ray' / 'auth_token'}, or in "
            f"$RAY_AUTH_TOKEN, or a file named by $RAY_AUTH_TOKEN_PATH")


def has_token() -> bool:
    """Whether Ray would find a token: $RAY_AUTH_TOKEN, $RAY_AUTH_TOKEN_PATH's file, or
    ~/.ray/auth_token (in that order, as Ray 2.60 looks)."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return True
    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token"
    return Path(path).is_file()


def connect(address: str | None = None, num_cpus: int | None = None) -> None:
    """Start embedded Ray (address None) or join the cluster at `address`; idempotent.
    Joining without a token, or failing to join, is a `RayTokenMissing` saying where the token
    goes, rather than Ray's many InvalidAuthToken lines."""
    if ray.is_initialized():
        return
    # Ray warns on every start that token authentication is on: it is on because we want it
    # on (see the module docstring), so the warning would only alarm users.
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(
        logging.ERROR)
    if address:
        os.environ.setdefault("RAY_AUTH_MODE", "token")
        if os.environ["RAY_AUTH_MODE"] == "token" and not has_token():
            raise RayTokenMissing(f"no Ray auth token found; {token_hint(address)}")
        try:
            ray.init(address=address, include_dashboard=False, log_to_driver=False,
                     configure_logging=True, logging_level=logging.WARNING)
        except ConnectionError as error:  # a wrong token looks the same as no cluster
            raise RayTokenMissing(f"could not join {address} ({error}); if it is running, "
                                  f"{token_hint(address)}") from error
        return
    # "local": always a new instance of our own; a bare ray.init() would join whatever
    # cluster a `ray start` left running on this machine.
    ray.init(address="local", num_cpus=num_cpus or os.cpu_count(), include_dashboard=False,
             log_to_driver=False, configure_logging=True, logging_level=logging.WARNING)


def cluster_cpus() -> float:
    return float(ray.cluster_resources().get("CPU", 0.0))


def alive_nodes() -> list[dict]:
    return [node for node in ray.nodes() if node.get("Alive")]
