"""Who is calling: a bearer token from the call's metadata names a tenant.

The token file has one `TENANT TOKEN` pair per line (`#` starts a comment). Without a token
file, every caller is the tenant "default" (and the server binds loopback only).
"""

from __future__ import annotations

import hmac
import re
from collections.abc import Iterable
from pathlib import Path

from services.errors import Unauthenticated

DEFAULT_TENANT = "default"
_TENANT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def load_tokens(path: str | Path) -> dict[str, str]:
    """token -> tenant, from the file; ValueError naming the line for a malformed one."""
    tokens: dict[str, str] = {}
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 2 or not _TENANT.fullmatch(parts[0]) or len(parts[1]) < 16:
            raise ValueError(f"{path}:{number}: expected 'TENANT TOKEN' (tenant from "
                             f"[A-Za-z0-9._-], token of at least 16 characters)")
        tokens[parts[1]] = parts[0]
    if not tokens:
        raise ValueError(f"{path}: no tokens")
    return tokens


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
