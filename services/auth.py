"""Who is calling: a bearer token from the call's metadata names a tenant.

The token file has one `TENANT TOKEN [max_priority=N]` line per token (`#` starts a comment).
`max_priority` is the highest `priority` that tenant's jobs may ask for (the server's
`--max-priority` when no line of the tenant sets it). Without a token file, every caller is the
tenant "default" (and the server binds loopback only).
"""

from __future__ import annotations

import hmac
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from services.errors import Unauthenticated

DEFAULT_TENANT = "default"
_TENANT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_MAX_PRIORITY = re.compile(r"max_priority=(-?[0-9]{1,10})")


@dataclass(frozen=True)
class TokenFile:
    tenants: dict[str, str]  # token -> tenant
    max_priority: dict[str, int] = field(default_factory=dict)  # tenant -> its cap, when set


def load_tokens(path: str | Path) -> TokenFile:
    """The tokens and tenant settings of the file; ValueError naming the line for a malformed
    one."""
    tokens: dict[str, str] = {}
    caps: dict[str, int] = {}
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) not in (2, 3) or not _TENANT.fullmatch(parts[0]) or len(parts[1]) < 16:
            raise ValueError(f"{path}:{number}: expected 'TENANT TOKEN [max_priority=N]' "
                             f"(tenant from [A-Za-z0-9._-], token of at least 16 characters)")
        tenant, token = parts[:2]
        if len(parts) == 3:
            match = _MAX_PRIORITY.fullmatch(parts[2])
            if match is None or not -2**31 <= int(match.group(1)) < 2**31:
                raise ValueError(f"{path}:{number}: expected max_priority=N (an integer of "
                                 f"int32's range) after the token, got {parts[2]!r}")
            cap = int(match.group(1))
            if caps.setdefault(tenant, cap) != cap:
                raise ValueError(f"{path}:{number}: {tenant} has max_priority={caps[tenant]} "
                                 f"on an earlier line")
        tokens[token] = tenant
    if not tokens:
        raise ValueError(f"{path}: no tokens")
    return TokenFile(tokens, caps)


class Authenticator:
    def __init__(self, tokens: dict[str, str] | None = None):
        self.tokens = dict(tokens or {})

    @property
    def enabled(self) -> bool:
        return bool(self.tokens)

    def tenant(self, metadata: Iterable[tuple[str, str | bytes]]) -> str:
        if not self.tokens:
            return DEFAULT_TENANT
        header = next((value for key, value in metadata if key == "authorization"), None)
        if not isinstance(header, str) or not header.startswith("Bearer "):
            raise Unauthenticated("authorization: send the metadata 'authorization: Bearer "
                                  "TOKEN'")
        presented = header.removeprefix("Bearer ").strip().encode()
        # compare_digest against every token: the time taken says nothing about which is close
        found = None
        for token, tenant in self.tokens.items():
            if hmac.compare_digest(presented, token.encode()):
                found = tenant
        if found is None:
            raise Unauthenticated("authorization: unknown token")
        return found
