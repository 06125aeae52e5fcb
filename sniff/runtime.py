"""``sniff run``: every configured proxy in one asyncio process until SIGINT/SIGTERM.

Startup binds every listener before announcing anything, so a port in use fails
the whole run with a message naming the proxy and exits non-zero. On a signal
the listeners stop accepting, open connections are closed, the capture is
flushed (and the live exporter drained) and the process exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from sniff import __version__, registry
from sniff.capture_proc import CaptureShipper
from sniff.config import Config
from sniff.decode_host import proxies_to_settings
from sniff.relay import Listener, ListenError
from sniff.store import BatchListener, CaptureWriter

if TYPE_CHECKING:
    from sniff.live import LiveExport

log = logging.getLogger("sniff")


def install_uvloop() -> str:
    try:
        import uvloop
    except ImportError:
        return "asyncio"
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return "uvloop"


class Runtime:
    def __init__(self, cfg: Config, out: TextIO = sys.stdout) -> None:
        self.cfg = cfg
        self.out = out
        self.writer: CaptureShipper | CaptureWriter | None = None
        self.listeners: list[Listener] = []
        self.live: LiveExport | None = None
        self._stop: asyncio.Event | None = None

    def request_stop(self) -> None:
        if self._stop is not None:
            self._stop.set()

    def _capture_settings(self) -> dict[str, Any]:
        cfg = self.cfg
        return {
            "capture": str(Path(cfg.capture).resolve()),
            "log_level": cfg.log_level,
            "identify_processes": cfg.identify_processes,
            "capture_defer": cfg.capture_defer,
            "services": cfg.services,
            "correlate": cfg.correlate,
            "otlp": cfg.export.otlp,
            "otlp_headers": cfg.export.otlp_headers,
            "proxies": proxies_to_settings(cfg.proxies),
        }

    async def start(self) -> None:
        cfg = self.cfg
        from correlate import shared_ids

        shared_ids.configure(cfg.correlate)
        if cfg.capture_process:
            # capture, identity, correlation and export in a child process (see sniff.capture_proc)
            self.writer = CaptureShipper(self._capture_settings(), cfg.capture_queue)
        else:
            from sniff.live import LiveExport

            self.live = LiveExport.from_config(cfg) if cfg.export.otlp else None
            listeners_cb: list[BatchListener] = (
                [self.live.on_batch] if self.live is not None else []
            )
            self.writer = CaptureWriter(
                cfg.capture,
                cfg.capture_queue,
                on_batch=listeners_cb,
                identify=cfg.identify_processes,
                proxies=cfg.proxies,
            )
        try:
            for p in cfg.proxies:
                lst: Listener = registry.module(p.protocol).create_listener(p, self.writer)
                await lst.start()
                self.listeners.append(lst)
        except BaseException:
            await self._stop_listeners()
            self._close_writer()
            raise

    async def _stop_listeners(self) -> None:
        for lst in self.listeners:
            try:
                await lst.stop()
            except Exception:
                log.exception("stopping %s failed", lst.cfg.name)
        self.listeners = []

    def _close_writer(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.live is not None:
            self.live.close()

    async def serve(self, on_ready: Callable[[], None] | None = None) -> int:
        self._stop = asyncio.Event()
        try:
            await self.start()
        except ListenError as e:
            print(f"sniff: {e}", file=sys.stderr)
            return 2
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self._stop.set)
        self._announce()
        if on_ready is not None:
            on_ready()
        await self._stop.wait()
        print("sniff: stopping...", file=self.out, flush=True)
        await self._stop_listeners()
        self._close_writer()
        w = self.writer
        assert w is not None
        print(
            f"sniff: stopped; {w.written} events captured to {self.cfg.capture}"
            f" ({w.dropped} dropped because the capture queue was full)",
            file=self.out,
            flush=True,
        )
        return 0

    def _announce(self) -> None:
        o = self.out
        print(f"sniff {__version__}: capturing to {self.cfg.capture}", file=o)
        for lst in self.listeners:
            p = lst.cfg
            tag = "traceparent injection on" if p.inject else "injection off"
            print(f"  {p.name:<12} {p.protocol:<8} {p.listen} -> {p.upstream}  ({tag})", file=o)
        if self.cfg.export.otlp:
            print(f"  live OTLP export to {self.cfg.export.otlp}", file=o)
            from exporters.otlp import unreachable

            why = unreachable(self.cfg.export.otlp, timeout=1.0)
            if why is not None:
                print(
                    f"  warning: the OTLP receiver cannot be reached now ({why}); sniff keeps "
                    "trying, and the capture keeps every event for `sniff export` later",
                    file=o,
                )
        print("ready; Ctrl-C or SIGTERM to stop", file=o, flush=True)


def run(cfg: Config) -> int:
    loop_kind = install_uvloop()
    log.debug("event loop: %s", loop_kind)
    from sniff import relay

    if not relay.HAVE_C:
        log.warning(
            "the C relay extension (sniff/_shipper.c) is not built: relaying on the slower "
            "pure-Python path; reinstall sniff with a C compiler present (scripts/setup.sh)"
        )
    rt = Runtime(cfg)
    return asyncio.run(rt.serve())
