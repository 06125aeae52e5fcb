"""Live export inside ``sniff run``: the capture writer's thread feeds each batch
of events to a Correlator, and finished spans go to an exporter thread, so
neither correlation nor the network slows the proxies' event loop. The
correlator's clock is the events' time, advanced by wall-clock ticks when idle
so that in-flight state still expires."""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Protocol

from correlate.engine import Correlator
from correlate.model import Span
from sniff.config import Config
from sniff.events import Event

log = logging.getLogger("sniff.live")


class SpanExporter(Protocol):
    def export(self, spans: list[Span]) -> bool: ...
    def shutdown(self) -> None: ...


class LiveExport:
    def __init__(
        self, correlator: Correlator, exporter: SpanExporter, max_batches: int = 1000
    ) -> None:
        self.correlator = correlator
        self.exporter = exporter
        self.q: queue.Queue[list[Span] | None] = queue.Queue(max_batches)
        self.dropped_spans = 0
        self._thread = threading.Thread(target=self._run, name="sniff-export", daemon=True)
        self._thread.start()

    @classmethod
    def from_config(cls, cfg: Config) -> LiveExport:
        from exporters.otlp import OtlpExporter

        assert cfg.export.otlp is not None
        corr = Correlator(services=cfg.services, options=cfg.correlate)
        return cls(corr, OtlpExporter(cfg.export.otlp, cfg.export.otlp_headers))

    def on_batch(self, events: list[Event]) -> None:
        spans = self.correlator.feed_many(events) if events else []
        # events reach this thread a little after their timestamps; the causal lag covers the rest
        spans += self.correlator.tick(time.time_ns() - 10**9)
        self._put(spans)

    def _put(self, spans: list[Span]) -> None:
        if not spans:
            return
        try:
            self.q.put_nowait(spans)
        except queue.Full:
            self.dropped_spans += len(spans)

    def _run(self) -> None:
        while True:
            item = self.q.get()
            if item is None:
                return
            batch = item
            while len(batch) < 512:  # coalesce what is already queued
                try:
                    more = self.q.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    self._export(batch)
                    return
                batch = batch + more
            self._export(batch)

    def _export(self, spans: list[Span]) -> None:
        try:
            if not self.exporter.export(spans):
                log.warning("live export: the receiver refused %d spans", len(spans))
        except Exception as e:
            log.warning("live export failed (%s); %d spans lost", e, len(spans))

    def close(self) -> None:
        self._put(self.correlator.finish())
        self.q.put(None)
        self._thread.join(timeout=30)
        self.exporter.shutdown()
