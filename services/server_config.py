"""The server's configuration file (`chainrule serve --config server.yaml`): its tenants, each
with its bearer tokens, its weight, the priorities it may ask for and its quotas.

    tenants:
      alice:
        tokens: [alice-token-0123456789]   # at least 16 characters each
        weight: 2                          # its share of the cluster (default 1)
        min_priority: 0                    # the lowest `priority` it may ask for (default: any)
        max_priority: 5                    # the highest (default: serve's --max-priority)
        max_running_cpus: 8                # quotas; each absent: no quota
        max_queued_jobs: 100
        max_stored_bytes: 10GiB            # uploads + checkpoints + models it keeps
        max_streams: 4                     # open WatchJob/log/upload/download streams
        submit_rate: 2                     # jobs submitted or resumed a second, sustained
        submit_burst: 20                   # ... and at once (defaults: serve's --submit-rate,
                                           #     --submit-burst)
        role: admin                        # may drain nodes (DrainNode); default: user

A file with a mistake is refused whole, with the key at fault (`tenants.alice.weight: must be
a number > 0, got 0`): a server never runs on half of what its operator wrote. The older token
file (services/auth.py, `serve --tokens`) says the same with fewer settings and still works.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import yaml

from services.auth import MIN_TOKEN_CHARS, ROLES, TENANT_NAME, Tenancy, TenantSettings

_UNITS = {"": 1, "B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "TiB": 1 << 40,
          "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
_BYTES = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*")
_INT32 = (-2**31, 2**31 - 1)
_TENANT_KEYS = ("tokens", "weight", "min_priority", "max_priority", "max_running_cpus",
                "max_queued_jobs", "max_stored_bytes", "max_streams", "submit_rate",
                "submit_burst", "role")


class ConfigError(ValueError):
    """The file, and the key in it, that the server cannot run with."""

    def __init__(self, path: str | Path, key: str, message: str):
        super().__init__(f"{path}: {key}: {message}" if key else f"{path}: {message}")


def load_server_config(path: str | Path) -> Tenancy:
    """The tenants the file configures; ConfigError naming the key for anything wrong."""
    try:
        document = yaml.safe_load(Path(path).read_text())
    except OSError as error:
        raise ConfigError(path, "", f"cannot read it: {error.strerror}") from None
    except yaml.YAMLError as error:
        raise ConfigError(path, "", f"not YAML: {error}") from None
    if not isinstance(document, dict):
        raise ConfigError(path, "", "expected a mapping with the key 'tenants'")
    for key in document:
        if key != "tenants":
            raise ConfigError(path, str(key), "unknown key; the file has 'tenants' only")
    tenants = document.get("tenants")
    if not isinstance(tenants, dict) or not tenants:
        raise ConfigError(path, "tenants", "expected a mapping of tenant name to settings")
    owners: dict[str, str] = {}
    max_priority: dict[str, int] = {}
    min_priority: dict[str, int] = {}
    settings: dict[str, TenantSettings] = {}
    admins: set[str] = set()
    for name, own in tenants.items():
        where = f"tenants.{name}"
        if not isinstance(name, str) or not TENANT_NAME.fullmatch(name):
            raise ConfigError(path, where, "a tenant name is 1-64 of [A-Za-z0-9._-], starting "
                                           "with a letter or digit")
        if not isinstance(own, dict):
            raise ConfigError(path, where, f"expected a mapping with the keys "
                                           f"{', '.join(_TENANT_KEYS)}")
        for key in own:
            if key not in _TENANT_KEYS:
                raise ConfigError(path, f"{where}.{key}",
                                  f"unknown key; expected one of {', '.join(_TENANT_KEYS)}")
        for token in _tokens(path, where, own.get("tokens")):
            if token in owners:
                raise ConfigError(path, f"{where}.tokens", f"a token of tenant "
                                                           f"{owners[token]} too")
            owners[token] = name
        low = _integer(path, f"{where}.min_priority", own.get("min_priority"), *_INT32)
        high = _integer(path, f"{where}.max_priority", own.get("max_priority"), *_INT32)
        if low is not None and high is not None and low > high:
            raise ConfigError(path, f"{where}.min_priority",
                              f"must be at most max_priority ({high}), got {low}")
        role = own.get("role", "user")
        if role not in ROLES:
            raise ConfigError(path, f"{where}.role", f"must be user or admin, got {role!r}")
        if role == "admin":
            admins.add(name)
        if low is not None:
            min_priority[name] = low
        if high is not None:
            max_priority[name] = high
        settings[name] = TenantSettings(
            weight=_number(path, f"{where}.weight", own.get("weight"), 1.0),
            max_running_cpus=_number(path, f"{where}.max_running_cpus",
                                     own.get("max_running_cpus"), math.inf),
            max_queued_jobs=_integer(path, f"{where}.max_queued_jobs",
                                     own.get("max_queued_jobs"), 1, 10**9) or 0,
            max_stored_bytes=_bytes(path, f"{where}.max_stored_bytes",
                                    own.get("max_stored_bytes")),
            max_streams=_integer(path, f"{where}.max_streams", own.get("max_streams"),
                                 1, 10**6) or 0,
            submit_rate=_number(path, f"{where}.submit_rate", own.get("submit_rate"), 0.0),
            submit_burst=_integer(path, f"{where}.submit_burst", own.get("submit_burst"),
                                  1, 10**6) or 0)
    return Tenancy(owners, max_priority, settings, min_priority, frozenset(admins))


def _tokens(path: str | Path, where: str, value: Any) -> list[str]:
    if (not isinstance(value, list) or not value
            or not all(isinstance(token, str) for token in value)):
        raise ConfigError(path, f"{where}.tokens", "expected a list of one or more tokens")
    for token in value:
        if len(token) < MIN_TOKEN_CHARS or token != token.strip() or " " in token:
            raise ConfigError(path, f"{where}.tokens", f"a token is at least {MIN_TOKEN_CHARS} "
                                                       f"characters without spaces")
    return value


def _number(path: str | Path, key: str, value: Any, default: float) -> float:
    if value is None:
        return default
    if (isinstance(value, bool) or not isinstance(value, int | float)
            or not 0 < value < math.inf):
        raise ConfigError(path, key, f"must be a number > 0, got {value!r}")
    return float(value)


def _integer(path: str | Path, key: str, value: Any, low: int, high: int) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ConfigError(path, key, f"must be a whole number from {low} to {high}, got "
                                     f"{value!r}")
    return value


def _bytes(path: str | Path, key: str, value: Any) -> int:
    """A size in bytes: a whole number, or a number with a unit (10GiB, 500 MB); 0: none."""
    if value is None:
        return 0
    match = _BYTES.fullmatch(str(value)) if not isinstance(value, bool) else None
    if match is None or match.group(2) not in _UNITS or isinstance(value, float):
        raise ConfigError(path, key, f"must be a size in bytes > 0 (a whole number, or with "
                                     f"one of the units {', '.join(u for u in _UNITS if u)}), "
                                     f"got {value!r}")
    size = int(float(match.group(1)) * _UNITS[match.group(2)])
    if size <= 0:
        raise ConfigError(path, key, f"must be a size in bytes > 0, got {value!r}")
    return size
