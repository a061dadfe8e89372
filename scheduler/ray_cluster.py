"""Where jobs run: an embedded Ray instance on this machine, or an existing cluster by address.

An embedded instance is this machine's alone: every process it starts listens on 127.0.0.1
only, and token authentication is on whatever the environment says (RAY_AUTH_MODE=token), with
a token generated for this process and kept in a private file (a 0700 temp folder, the file
0600) rather than in the ~/.ray/auth_token that every Ray of this user shares. Joining an
existing cluster needs RAY_AUTH_MODE=token and the cluster's token, as its own processes have.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import ray
import ray._private.ray_constants as ray_constants
from ray._raylet import (  # type: ignore[attr-defined]  # compiled; its stub lacks these
    AuthenticationTokenLoader,
    Config,
)

from scheduler.ray_head import RayHead

AUTH_MODE_VARIABLE = "RAY_AUTH_MODE"
TOKEN_PATH_VARIABLE = "RAY_AUTH_TOKEN_PATH"
TOKEN_VARIABLE = "RAY_AUTH_TOKEN"


class RayTokenMissing(RuntimeError):
    """Joining a cluster needs its auth token, and this process has none (or a wrong one)."""


def token_hint(address: str) -> str:
    """One line on where the cluster's token goes, for a user whose join failed."""
    return (f"the Ray cluster at {address} uses token authentication: run with "
            f"RAY_AUTH_MODE=token and put the cluster's token (the head node's "
            f"~/.ray/auth_token) in {Path.home() / '.ray' / 'auth_token'}, or in "
            f"${TOKEN_VARIABLE}, or a file named by ${TOKEN_PATH_VARIABLE}")


def has_token() -> bool:
    """Whether Ray would find a token: $RAY_AUTH_TOKEN, $RAY_AUTH_TOKEN_PATH's file, or
    ~/.ray/auth_token (in that order, as Ray 2.60 looks)."""
    if os.environ.get(TOKEN_VARIABLE):
        return True
    path = os.environ.get(TOKEN_PATH_VARIABLE) or Path.home() / ".ray" / "auth_token"
    return Path(path).is_file()


def connect(address: str | None = None, num_cpus: int | None = None,
            namespace: str | None = None) -> None:
    """Start embedded Ray (address None) or join the cluster at `address`, as a driver in
    `namespace` (None: an anonymous one of its own); idempotent. Joining without a token, or
    failing to join, is a `RayTokenMissing` saying where the token goes, rather than Ray's
    many InvalidAuthToken lines."""
    if ray.is_initialized():
        return
    # Ray warns on every start that token authentication is on: it is on because we want it
    # on (see the module docstring), so the warning would only alarm users.
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(
        logging.ERROR)
    if address:
        os.environ.setdefault(AUTH_MODE_VARIABLE, "token")
        if os.environ[AUTH_MODE_VARIABLE] == "token" and not has_token():
            raise RayTokenMissing(f"no Ray auth token found; {token_hint(address)}")
        try:
            ray.init(address=address, namespace=namespace, include_dashboard=False,
                     log_to_driver=False, configure_logging=True,
                     logging_level=logging.WARNING)
        except ConnectionError as error:
            # A wrong token looks the same as no cluster, and so does a machine with no node of
            # the cluster: a driver joins through a raylet on its own machine (Ray waits 60 s
            # for one, measured on Ray 2.60).
            raise RayTokenMissing(f"could not join {address} ({error}); a driver joins through "
                                  f"a node of the cluster on its own machine (`ray start "
                                  f"--address={address}` here first); if this machine is one "
                                  f"and the cluster is running, {token_hint(address)}"
                                  ) from error
        return
    use_private_token()
    # "local": always a new instance of our own; a bare ray.init() would join whatever
    # cluster a `ray start` left running on this machine.
    with _node_address_on_loopback():
        ray.init(address="local", num_cpus=num_cpus or os.cpu_count(), namespace=namespace,
                 include_dashboard=False, log_to_driver=False, configure_logging=True,
                 logging_level=logging.WARNING)


# --- the embedded instance's token and address ------------------------------------------------

_private_token_path: Path | None = None


def private_token_path() -> Path:
    """This process's Ray token file, made on first use: 64 random hex digits in a 0600 file in
    a 0700 temp folder, removed when the process exits. One token for every embedded instance
    the process starts, so that Ray's cached copy of it (Ray reads a token once per process)
    always matches the running instance's."""
    global _private_token_path
    if _private_token_path is None or not _private_token_path.is_file():
        folder = Path(tempfile.mkdtemp(prefix="chainrule-ray-"))  # mkdtemp: 0700
        atexit.register(_remove_if_ours, folder, os.getpid())
        path = folder / "auth_token"
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w") as file:
            file.write(secrets.token_hex(32))
        _private_token_path = path
    return _private_token_path


def _remove_if_ours(folder: Path, creator: int) -> None:
    if os.getpid() == creator:  # not in a forked child that exits while we still run Ray
        shutil.rmtree(folder, ignore_errors=True)


def join_head(head: RayHead, token: Path, namespace: str) -> None:
    """Join a head this machine started (scheduler/ray_head.py) as a driver in `namespace`,
    with its token; idempotent."""
    if ray.is_initialized():
        return
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(
        logging.ERROR)
    _use_token(token)
    with _node_address_on_loopback():  # the node's address is 127.0.0.1: find it by that
        ray.init(address=head.address, namespace=namespace, include_dashboard=False,
                 log_to_driver=False, configure_logging=True, logging_level=logging.WARNING)


def use_private_token() -> None:
    """Token authentication on for this process and the Ray processes it starts, with its
    private token (`private_token_path`): an embedded instance's, or a test's cluster."""
    _use_token(private_token_path())


def _use_token(token: Path) -> None:
    """Token authentication on for this process and the Ray processes it starts (they inherit
    the environment), with `token`, even if the environment turned it off or named
    another token: an embedded instance is never open, and never shares a token by accident."""
    os.environ[AUTH_MODE_VARIABLE] = "token"
    os.environ[TOKEN_PATH_VARIABLE] = str(token)
    os.environ.pop(TOKEN_VARIABLE, None)  # it would take precedence over the file
    # Ray reads RAY_AUTH_MODE into its config when imported, and caches the token once read:
    # both are refreshed as Ray's own `ray.init` does when it turns token auth on itself.
    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


@contextlib.contextmanager
def _node_address_on_loopback() -> Iterator[None]:
    """Make the node Ray starts take 127.0.0.1 as its address, so that its GCS, raylet, workers
    and agents listen on loopback only (Ray binds to 127.0.0.1 when that is the node's address,
    else to every interface). Ray has no setting for this on Linux: ray.init turns 127.0.0.1
    into the host's network address unless its cluster support is off, which is how it runs on
    Windows and macOS (ray_constants.ENABLE_RAY_CLUSTER, read from
    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER when Ray is imported, hence set here, around the start
    only). tests/scheduler/test_ray_cluster.py checks every listening socket."""
    before = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = before


def cluster_cpus() -> float:
    return float(ray.cluster_resources().get("CPU", 0.0))


def alive_nodes() -> list[dict]:
    return [node for node in ray.nodes() if node.get("Alive")]
