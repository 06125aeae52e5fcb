"""The ``sniff`` command: run, stats, traces, export, merge.

Errors a user can fix (bad config, port in use, missing capture) print one
line naming the problem and exit non-zero (2 for usage and config, 1 for
runtime failures); tracebacks are kept for bugs.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from sniff import __version__
from sniff.config import Config, ConfigError


def _parse_time(value: str | None) -> int | None:
    """ISO 8601 (``2026-11-21T18:00:00``, UTC unless an offset is given), Unix
    seconds, or a relative ``-5m`` / ``-2h`` / ``-30s`` before now."""
    if value is None:
        return None
    v = value.strip()
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    if v.startswith("-") and v[-1:] in units and v[1:-1].replace(".", "", 1).isdigit():
        return time.time_ns() - int(float(v[1:-1]) * units[v[-1]] * 1e9)
    try:
        return int(float(v) * 1e9)
    except ValueError:
        pass
    try:
        dt = datetime.fromisoformat(v.replace("Z", "+00:00"))
    except ValueError:
        raise ConfigError(
            f"time {value!r}: use ISO 8601 (2026-11-21T18:00:00), Unix seconds or -5m"
        ) from None
    if dt.tzinfo is None:
        from datetime import UTC

        dt = dt.replace(tzinfo=UTC)
    return int(dt.timestamp() * 1e9)


def _load_config(args: argparse.Namespace) -> Config:
    from sniff import config as cfgmod

    cfg = cfgmod.load(args.config) if getattr(args, "config", None) else Config()
    quick = getattr(args, "proxy", None) or []
    if quick:
        tables = [cfgmod.parse_quick_proxy(spec, i) for i, spec in enumerate(quick)]
        try:
            extra = cfgmod.from_dict({"proxy": tables}, "--proxy")
        except ConfigError as e:
            raise ConfigError(f"--proxy: {e}") from None
        cfg.proxies.extend(extra.proxies)
        cfgmod._check_unique(cfg.proxies)
    if getattr(args, "capture", None):
        cfg.capture = args.capture
    if getattr(args, "otlp", None):
        cfg.export.otlp = cfgmod.from_dict({"export": {"otlp": args.otlp}}).export.otlp
    return cfg


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def cmd_run(args: argparse.Namespace) -> int:
    cfg = _load_config(args)
    if not cfg.proxies:
        raise ConfigError(
            "no proxies: give -c sniff.toml with [[proxy]] tables, or --proxy amqp:LISTEN=UPSTREAM"
        )
    _setup_logging(args.log_level or cfg.log_level)
    from sniff.runtime import run

    return run(cfg)


def _reader(path: str) -> Any:
    from sniff.store import CaptureReader

    try:
        return CaptureReader(path)
    except FileNotFoundError as e:
        raise ConfigError(str(e)) from None
    except ValueError as e:
        raise ConfigError(str(e)) from None


def cmd_stats(args: argparse.Namespace) -> int:
    from rich.console import Console

    from sniff.stats import render

    cfg = _load_config(args)
    r = _reader(args.capture_file)
    data = render(r, Console(), cfg.services)
    if args.json:
        import orjson

        Path(args.json).write_bytes(
            orjson.dumps(data, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS)
        )
    return 0


def cmd_traces(args: argparse.Namespace) -> int:
    from rich.console import Console

    from correlate.offline import all_spans
    from exporters.console import print_traces

    cfg = _load_config(args)
    r = _reader(args.capture_file)
    spans = all_spans(
        r,
        services=cfg.services,
        options=cfg.correlate,
        since_ns=_parse_time(args.since),
        until_ns=_parse_time(args.until),
    )
    console = Console()
    shown = print_traces(
        spans, console, service=args.service, operation=args.operation, limit=args.limit
    )
    n_traces = len({s.trace_id for s in spans})
    console.print(f"[dim]{shown} of {n_traces} traces shown ({len(spans)} spans)[/dim]")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from correlate.offline import iter_spans

    cfg = _load_config(args)
    if not (args.otlp or args.jaeger_json):
        raise ConfigError("export: give --otlp URL and/or --jaeger-json FILE")
    r = _reader(args.capture_file)
    otlp = None
    if args.otlp:
        from exporters.otlp import OtlpExporter, unreachable

        url = cfg.export.otlp or args.otlp
        why = unreachable(url)
        if why is not None:
            print(
                f"sniff export: cannot reach the OTLP receiver at {url} ({why}); nothing sent",
                file=sys.stderr,
            )
            return 1
        otlp = OtlpExporter(url, cfg.export.otlp_headers)
    collected = []
    total = 0
    traces: set[str] = set()
    ok = True
    for batch in iter_spans(
        r,
        services=cfg.services,
        options=cfg.correlate,
        since_ns=_parse_time(args.since),
        until_ns=_parse_time(args.until),
    ):
        if args.service:
            batch = [s for s in batch if args.service.lower() in s.service.lower()]
        total += len(batch)
        traces.update(s.trace_id for s in batch)
        if otlp is not None and batch:
            ok = otlp.export(batch) and ok
        if args.jaeger_json:
            collected.extend(batch)
    if otlp is not None:
        otlp.shutdown()
        print(
            f"exported {otlp.sent} spans in {len(traces)} traces to {otlp.url}"
            + ("" if ok else f" ({otlp.failed} spans refused or undeliverable)")
        )
    if args.jaeger_json:
        import orjson

        from exporters.jaeger_json import to_jaeger

        Path(args.jaeger_json).write_bytes(orjson.dumps(to_jaeger(collected)))
        print(
            f"wrote {total} spans in {len(traces)} traces to {args.jaeger_json} (Jaeger UI: Search > JSON File)"
        )
    return 0 if ok else 1


def cmd_report(args: argparse.Namespace) -> int:
    from rich.console import Console

    from correlate.offline import all_spans
    from exporters import report

    cfg = _load_config(args)
    console = Console()

    def build(path: str) -> Any:
        r = _reader(path)
        return report.build(
            all_spans(
                r,
                services=cfg.services,
                options=cfg.correlate,
                since_ns=_parse_time(args.since),
                until_ns=_parse_time(args.until),
            )
        )

    ops = build(args.capture_file)
    if args.diff:
        report.diff(ops, build(args.diff), console)
    else:
        report.render(ops, console, min_traces=args.min_traces, top=args.top)
    if args.json:
        import orjson

        Path(args.json).write_bytes(orjson.dumps(report.as_dict(ops), option=orjson.OPT_INDENT_2))
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from sniff.store import merge

    for p in args.inputs:
        _reader(p).close()
    try:
        n = merge(args.inputs, args.output)
    except FileExistsError as e:
        raise ConfigError(str(e)) from None
    print(f"merged {n} events from {len(args.inputs)} captures into {args.output}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sniff", description="Black-box tracer for AMQP, SQL and HTTP."
    )
    p.add_argument("--version", action="version", version=f"sniff {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="run the proxies of a config (or --proxy) until SIGINT/SIGTERM")
    r.add_argument("-c", "--config", help="TOML config file (see README)")
    r.add_argument(
        "--proxy",
        action="append",
        metavar="[NAME@]PROTO:LISTEN=UPSTREAM",
        help="a proxy without a config file, e.g. amqp:127.0.0.1:5673=127.0.0.1:5672 (repeatable)",
    )
    r.add_argument("--capture", help="capture file (default: the config's, or ./sniff-capture.db)")
    r.add_argument("--otlp", help="live OTLP export URL (http://host:4318 or grpc://host:4317)")
    r.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    r.set_defaults(fn=cmd_run)

    def capture_cmd(name: str, help_: str) -> argparse.ArgumentParser:
        c = sub.add_parser(name, help=help_)
        c.add_argument("capture_file", metavar="CAPTURE")
        c.add_argument(
            "-c", "--config", help="config whose [services] and [correlate] tables apply"
        )
        return c

    s = capture_cmd("stats", "counts by protocol, event kind and service")
    s.add_argument("--json", metavar="FILE", help="also write the numbers as JSON")
    s.set_defaults(fn=cmd_stats)

    for name, help_, fn in (
        ("traces", "print the correlated traces as trees", cmd_traces),
        ("export", "export the correlated traces (OTLP, Jaeger JSON)", cmd_export),
    ):
        c = capture_cmd(name, help_)
        c.add_argument(
            "--service", help="only traces (spans, for export) involving this service (substring)"
        )
        c.add_argument("--since", help="ISO time, Unix seconds or -5m")
        c.add_argument("--until", help="ISO time, Unix seconds or -5m")
        if name == "traces":
            c.add_argument(
                "--operation", help="only traces with a span whose name or db operation matches"
            )
            c.add_argument("--limit", type=int, help="at most this many traces")
        else:
            c.add_argument(
                "--otlp", metavar="URL", help="OTLP receiver (http://host:4318 or grpc://host:4317)"
            )
            c.add_argument(
                "--jaeger-json",
                metavar="FILE",
                help="write Jaeger query-API JSON for the Jaeger UI",
            )
        c.set_defaults(fn=fn)

    rp = capture_cmd(
        "report", "per logical operation: each component's statements, requests and messages"
    )
    rp.add_argument(
        "--diff", metavar="CAPTURE_B", help="compare with another capture (another version)"
    )
    rp.add_argument("--since", help="ISO time, Unix seconds or -5m")
    rp.add_argument("--until", help="ISO time, Unix seconds or -5m")
    rp.add_argument("--min-traces", type=int, default=1, help="hide operations seen fewer times")
    rp.add_argument("--top", type=int, default=10, help="at most this many operations")
    rp.add_argument("--json", metavar="FILE", help="also write the report as JSON")
    rp.set_defaults(fn=cmd_report)

    m = sub.add_parser("merge", help="merge captures from several sniff processes")
    m.add_argument("inputs", nargs="+", metavar="CAPTURE")
    m.add_argument("-o", "--output", required=True)
    m.set_defaults(fn=cmd_merge)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.fn(args))
    except ConfigError as e:
        print(f"sniff: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0
