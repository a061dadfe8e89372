"""Who is calling: a bearer token from the call's metadata names a tenant.

The token file has one `TENANT TOKEN [SETTING=VALUE ...]` line per token (`#` starts a
comment). A tenant's settings, on any of its lines (the same value on each):
  - `max_priority=N`: the highest `priority` its jobs may ask for (the server's
    `--max-priority` when not set);
  - `weight=W`: its share of the cluster against the other tenants' (weighted fair share;
    default 1);
  - `max_running_cpus=C`: the CPUs its running jobs may hold at once (default: no quota);
  - `max_queued_jobs=Q`: the jobs it may have queued at once (default: no quota);
  - `role=admin`: it may also operate the cluster (drain a node: `DrainNode`); the default
    role, `user`, may not.
Without a token file, every caller is the tenant "default" and an admin (the server binds
loopback only: whoever reaches it runs it). The server's YAML configuration file
(services/server_config.py, `serve --config`) names the same settings and more (a lowest
priority, stored-bytes and streams quotas).
"""

from __future__ import annotations

import hmac
import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from services.errors import Unauthenticated

DEFAULT_TENANT = "default"
TENANT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
MIN_TOKEN_CHARS = 16
_SETTING = re.compile(r"([a-z_]+)=(.*)")


def _int32(text: str) -> int | None:
    return int(text) if re.fullmatch(r"-?[0-9]{1,10}", text) and -2**31 <= int(text) < 2**31 \
        else None


def _positive_number(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if 0 < value < math.inf else None


def _count(text: str) -> int | None:
    return int(text) if re.fullmatch(r"[0-9]{1,9}", text) and int(text) > 0 else None


ROLES = ("user", "admin")


def _role(text: str) -> str | None:
    return text if text in ROLES else None


# setting -> (its parser, returning None for a bad value; what a good value is)
_SETTINGS: dict[str, tuple[Callable[[str], float | int | str | None], str]] = {
    "max_priority": (_int32, "an integer of int32's range"),
    "weight": (_positive_number, "a number > 0"),
    "max_running_cpus": (_positive_number, "a number of CPUs > 0"),
    "max_queued_jobs": (_count, "a whole number > 0"),
    "role": (_role, "user or admin"),
}


@dataclass(frozen=True)
class TenantSettings:
    weight: float = 1.0
    max_running_cpus: float = math.inf
    max_queued_jobs: int = 0  # 0: no quota
    max_stored_bytes: int = 0  # uploads + checkpoints + models kept; 0: no quota
    max_streams: int = 0  # streaming calls open at once; 0: the server's per-tenant limit
    submit_rate: float = 0.0  # jobs submitted (or resumed) a second; 0: the server's default
    submit_burst: int = 0  # submits at once after a quiet spell; 0: the server's default


@dataclass(frozen=True)
class Tenancy:
    """Who the tenants are and what each may do: from a token file or a configuration file."""

    tenants: dict[str, str]  # token -> tenant
    max_priority: dict[str, int] = field(default_factory=dict)  # tenant -> its cap, when set
    settings: dict[str, TenantSettings] = field(default_factory=dict)  # tenant -> when set
    min_priority: dict[str, int] = field(default_factory=dict)  # tenant -> its floor, when set
    admins: frozenset[str] = frozenset()  # tenants with role=admin


def load_tokens(path: str | Path) -> Tenancy:
    """The tokens and tenant settings of the file; ValueError naming the line for a malformed
    one."""
    tokens: dict[str, str] = {}
    values: dict[str, dict[str, float | int | str]] = {}
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if (len(parts) < 2 or not TENANT_NAME.fullmatch(parts[0])
                or len(parts[1]) < MIN_TOKEN_CHARS):
            raise ValueError(f"{path}:{number}: expected 'TENANT TOKEN [SETTING=VALUE ...]' "
                             f"(tenant from [A-Za-z0-9._-], token of at least 16 characters)")
        tenant, token = parts[:2]
        for part in parts[2:]:
            match = _SETTING.fullmatch(part)
            if match is None or match.group(1) not in _SETTINGS:
                raise ValueError(f"{path}:{number}: expected SETTING=VALUE after the token, "
                                 f"one of max_priority=N, weight=W, max_running_cpus=C, "
                                 f"max_queued_jobs=Q, role=admin; got {part!r}")
            name, text = match.groups()
            parse, expected = _SETTINGS[name]
            value = parse(text)
            if value is None:
                raise ValueError(f"{path}:{number}: {name} must be {expected}, got {text!r}")
            if values.setdefault(tenant, {}).setdefault(name, value) != value:
                raise ValueError(f"{path}:{number}: {tenant} has {name}="
                                 f"{values[tenant][name]} on an earlier line")
        tokens[token] = tenant
    if not tokens:
        raise ValueError(f"{path}: no tokens")
    caps = {tenant: int(own["max_priority"]) for tenant, own in values.items()
            if "max_priority" in own}
    settings = {tenant: TenantSettings(
        weight=float(own.get("weight", 1.0)),
        max_running_cpus=float(own.get("max_running_cpus", math.inf)),
        max_queued_jobs=int(own.get("max_queued_jobs", 0)))
        for tenant, own in values.items() if set(own) - {"max_priority", "role"}}
    admins = frozenset(tenant for tenant, own in values.items() if own.get("role") == "admin")
    return Tenancy(tokens, caps, settings, admins=admins)


class Authenticator:
    def __init__(self, tokens: dict[str, str] | None = None,
                 admins: frozenset[str] = frozenset()):
        self.tokens = dict(tokens or {})
        self.admins = admins

    def is_admin(self, tenant: str) -> bool:
        """Whether `tenant` (as `tenant()` named it) may operate the cluster: every caller
        when there are no tokens (module docstring)."""
        return not self.tokens or tenant in self.admins

    @property
    def enabled(self) -> bool:
        return bool(self.tokens)

    def tenant(self, metadata: Iterable[tuple[str, str | bytes]]) -> str:
        if not self.tokens:
            return DEFAULT_TENANT
        header = next((value for key, value in metadata if key == "authorization"), None)
        if not isinstance(header, str) or not header.startswith("Bearer "):
            raise Unauthenticated("authorization: this server needs a token, sent as the "
                                  "metadata 'authorization: Bearer TOKEN' (the chainrule "
                                  "command: --token-file FILE or $CHAINRULE_TOKEN; Python: "
                                  "Client(token=...))")
        presented = header.removeprefix("Bearer ").strip().encode()
        # compare_digest against every token: the time taken says nothing about which is close
        found = None
        for token, tenant in self.tokens.items():
            if hmac.compare_digest(presented, token.encode()):
                found = tenant
        if found is None:
            raise Unauthenticated("authorization: unknown token")
        return found
