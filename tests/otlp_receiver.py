"""A real OTLP receiver for tests: OTLP/HTTP protobuf (POST /v1/traces) and
OTLP/gRPC, decoding requests with opentelemetry-proto."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

from tests.helpers import free_port


def _value(v: Any) -> Any:
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return [_value(x) for x in v.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: _value(kv.value) for kv in v.kvlist_value.values}
    return getattr(v, kind) if kind else None


_KIND = {
    trace_pb2.Span.SPAN_KIND_CLIENT: "CLIENT",
    trace_pb2.Span.SPAN_KIND_SERVER: "SERVER",
    trace_pb2.Span.SPAN_KIND_PRODUCER: "PRODUCER",
    trace_pb2.Span.SPAN_KIND_CONSUMER: "CONSUMER",
    trace_pb2.Span.SPAN_KIND_INTERNAL: "INTERNAL",
}


def flatten(req: trace_service_pb2.ExportTraceServiceRequest) -> list[dict[str, Any]]:
    """Each span as a plain dict, with its resource attributes."""
    out = []
    for rs in req.resource_spans:
        res = {kv.key: _value(kv.value) for kv in rs.resource.attributes}
        for ss in rs.scope_spans:
            for sp in ss.spans:
                out.append(
                    {
                        "trace_id": sp.trace_id.hex(),
                        "span_id": sp.span_id.hex(),
                        "parent_id": sp.parent_span_id.hex() or None,
                        "name": sp.name,
                        "kind": _KIND.get(sp.kind, "UNSPECIFIED"),
                        "start": sp.start_time_unix_nano,
                        "end": sp.end_time_unix_nano,
                        "attrs": {kv.key: _value(kv.value) for kv in sp.attributes},
                        "links": [(lk.trace_id.hex(), lk.span_id.hex()) for lk in sp.links],
                        "status": sp.status.code,
                        "status_message": sp.status.message,
                        "resource": res,
                        "scope": ss.scope.name,
                    }
                )
    return out


class OtlpHttpReceiver:
    def __init__(self) -> None:
        self.port = free_port()
        self.requests: list[trace_service_pb2.ExportTraceServiceRequest] = []
        self.paths: list[str] = []
        recv = self

        class H(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.headers.get("Content-Encoding") == "gzip":
                    import gzip

                    body = gzip.decompress(body)
                req = trace_service_pb2.ExportTraceServiceRequest()
                req.ParseFromString(body)
                recv.requests.append(req)
                recv.paths.append(self.path)
                resp = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(resp)))
                self.end_headers()
                self.wfile.write(resp)

            def log_message(self, *a: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), H)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def spans(self) -> list[dict[str, Any]]:
        return [s for r in list(self.requests) for s in flatten(r)]

    def __enter__(self) -> OtlpHttpReceiver:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.shutdown()
        self.server.server_close()


class OtlpGrpcReceiver:
    def __init__(self) -> None:
        from concurrent import futures

        import grpc
        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc

        self.port = free_port()
        self.requests: list[trace_service_pb2.ExportTraceServiceRequest] = []
        recv = self

        class Svc(trace_service_pb2_grpc.TraceServiceServicer):
            def Export(self, request, context):
                recv.requests.append(request)
                return trace_service_pb2.ExportTraceServiceResponse()

        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Svc(), self.server)
        self.server.add_insecure_port(f"127.0.0.1:{self.port}")

    @property
    def url(self) -> str:
        return f"grpc://127.0.0.1:{self.port}"

    def spans(self) -> list[dict[str, Any]]:
        return [s for r in list(self.requests) for s in flatten(r)]

    def __enter__(self) -> OtlpGrpcReceiver:
        self.server.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.stop(0)
