"""The ``[correlate]`` table: its keys, defaults and validation (errors name the key)."""

from __future__ import annotations

from typing import Any

KEYS: dict[str, tuple[type | tuple[type, ...], Any, str]] = {
    "lag_ms": ((int, float), 2000, "how far behind the newest event causal decisions are made"),
    "recent_s": ((int, float), 60, "how long an ended unit of work stays matchable by shared ids"),
    "ttl_s": ((int, float), 600, "in-flight state older than this is expired (and counted)"),
    "id_headers": (list, [], "extra header names whose values are shared ids"),
    "id_json_keys": (list, [], "extra JSON keys whose values are shared ids"),
    "id_regexes": (
        list,
        [],
        "regexes whose group 1 (or match) in URLs, SQL text and bodies is an id",
    ),
    "uuid_ids": (bool, True, "treat UUIDs in URLs, SQL text and bodies as shared ids"),
    "timing_exclude": (list, [], "component names never attributed by timing alone"),
}


def validate(table: dict[str, Any], where: str = "correlate") -> dict[str, Any]:
    from sniff.config import ConfigError

    out: dict[str, Any] = {}
    for k, v in table.items():
        if k not in KEYS:
            raise ConfigError(f"{where}.{k}: unknown key; known keys: {', '.join(sorted(KEYS))}")
        typ, _default, _help = KEYS[k]
        types = typ if isinstance(typ, tuple) else (typ,)
        if (isinstance(v, bool) and bool not in types) or not isinstance(v, types):
            raise ConfigError(
                f"{where}.{k}: expected {' or '.join(t.__name__ for t in types)}, got {v!r}"
            )
        if isinstance(v, list) and not all(isinstance(x, str) for x in v):
            raise ConfigError(f"{where}.{k}: expected a list of strings, got {v!r}")
        if isinstance(v, int | float) and not isinstance(v, bool) and v < 0:
            raise ConfigError(f"{where}.{k}: must be >= 0, got {v!r}")
        out[k] = v
    from correlate import shared_ids

    try:
        shared_ids.Settings()  # the regexes compile?
        _check_regexes(out.get("id_regexes", []))
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return out


def _check_regexes(rx: list[str]) -> None:
    import re

    for r in rx:
        try:
            re.compile(r)
        except re.error as e:
            raise ValueError(f"correlate.id_regexes: {r!r} is not a valid regex: {e}") from None
