"""The mysql proxy's options: errors name the key and say how to fix it."""

from __future__ import annotations

from pathlib import Path

import pytest

from sniff.config import ConfigError, from_dict


def _cfg(**opts: object) -> dict[str, object]:
    return {
        "proxy": [
            {"protocol": "mysql", "listen": "127.0.0.1:13306", "upstream": "127.0.0.1:3306", **opts}
        ]
    }


def test_defaults() -> None:
    p = from_dict(_cfg()).proxies[0]
    assert p.options == {
        "capture_sql_literals": False,
        "sqlcommenter": False,
        "max_statement_bytes": 65536,
        "tls": None,
        "decode": "capture",  # generic: where decoding runs (see sniff.decode_host)
    }


@pytest.mark.parametrize(
    "opts,message",
    [
        ({"sqlcommenter": "yes"}, "proxy[0].sqlcommenter: expected true or false"),
        ({"max_statement_bytes": 10}, "proxy[0].max_statement_bytes: must be at least 256"),
        ({"tls": {"key": "k.pem"}}, "proxy[0].tls.cert: missing"),
        (
            {"tls": {"cert": "/nonexistent.pem"}},
            "proxy[0].tls.cert: '/nonexistent.pem' does not exist",
        ),
        ({"tls": {"cert": "x", "port": 1}}, "proxy[0].tls.port: unknown key"),
        ({"tls": "on"}, "proxy[0].tls: expected a table"),
    ],
)
def test_errors(opts: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        from_dict(_cfg(**opts))


def test_tls_files_are_loaded_up_front(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pem"
    bad.write_text("not a certificate")
    with pytest.raises(ConfigError, match=r"proxy\[0\]\.tls: cannot load cert"):
        from_dict(_cfg(tls={"cert": str(bad), "key": str(bad)}))
    with pytest.raises(ConfigError, match=r"proxy\[0\]\.tls\.upstream: 'sometimes' is not one of"):
        from_dict(_cfg(tls={"cert": str(bad), "upstream": "sometimes"}))
