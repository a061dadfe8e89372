"""Where jobs run: an embedded Ray instance on this machine, or an existing cluster by address.

Token authentication stays on (Ray's default for local instances); joining an existing cluster
needs RAY_AUTH_MODE=token in the environment, as the cluster's own processes have.
"""

from __future__ import annotations

import logging
import os

import ray


def connect(address: str | None = None, num_cpus: int | None = None) -> None:
    """Start embedded Ray (address None) or join the cluster at `address`; idempotent."""
    if ray.is_initialized():
        return
    # Ray warns on every start that token authentication is on: it is on because we want it
    # on (see the module docstring), so the warning would only alarm users.
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(
        logging.ERROR)
    if address:
        os.environ.setdefault("RAY_AUTH_MODE", "token")
        cpus = None  # the cluster's own
    else:
        # "local": always a new instance of our own; a bare ray.init() would join whatever
        # cluster a `ray start` left running on this machine.
        address, cpus = "local", num_cpus or os.cpu_count()
    ray.init(address=address, num_cpus=cpus, include_dashboard=False, log_to_driver=False,
             configure_logging=True, logging_level=logging.WARNING)


def cluster_cpus() -> float:
    return float(ray.cluster_resources().get("CPU", 0.0))


def alive_nodes() -> list[dict]:
    return [node for node in ray.nodes() if node.get("Alive")]
