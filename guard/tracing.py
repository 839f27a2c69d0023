"""OpenTelemetry spans for the request, the probe, the generation and the scoring.

Off unless ``otlp_endpoint`` is set (then the optional extra ``otel`` is needed): a disabled
:class:`Tracing` imports nothing, opens no span and leaves the client's ``traceparent`` to go
upstream untouched, as before. Enabled, each HTTP request gets a server span whose parent is
the client's W3C ``traceparent`` (if any); under it ``probe``, ``generation`` and ``scoring``;
the probe and generation calls carry the guard's own ``traceparent`` (their span's), so the
upstream's spans join the same trace. Spans go over OTLP/HTTP (protobuf) in batches.

The tracer provider belongs to the app (passed in, shut down with it); the global provider is
never set, so two apps in one process (tests) never share spans. Span attributes carry ids,
routes, actions and statuses, never prompt text.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

TRACE_HEADERS = ("traceparent", "tracestate")


class Tracing:
    def __init__(self, provider: Any = None) -> None:
        self.provider = provider
        self._tracer = provider.get_tracer("refusal_guard") if provider is not None else None
        if provider is not None:
            from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

            self._propagator = TraceContextTextMapPropagator()

    @property
    def enabled(self) -> bool:
        return self._tracer is not None

    @contextlib.contextmanager
    def span(self, name: str, *, parent: Mapping[str, str] | None = None, server: bool = False,
             **attributes: Any) -> Iterator[Any]:
        """A span around the block (the current one becomes its parent, or ``parent``'s
        ``traceparent`` header); yields it, or None when tracing is off."""
        if self._tracer is None:
            yield None
            return
        from opentelemetry.trace import SpanKind

        context = self._propagator.extract(dict(parent)) if parent is not None else None
        kind = SpanKind.SERVER if server else SpanKind.INTERNAL
        attrs = {k: v for k, v in attributes.items() if v is not None}
        with self._tracer.start_as_current_span(name, context=context, kind=kind, attributes=attrs) as span:
            yield span

    def inject(self, headers: Mapping[str, str]) -> Mapping[str, str]:
        """``headers`` with the current span's ``traceparent`` in place of the client's (if tracing)."""
        if self._tracer is None:
            return headers
        out = {k: v for k, v in headers.items() if k.lower() not in TRACE_HEADERS}
        self._propagator.inject(out)
        return out

    def shutdown(self) -> None:
        """Export what is still buffered, then stop (blocks up to the exporter's timeout)."""
        if self.provider is not None:
            self.provider.shutdown()


def tracing_for(endpoint: str | None, service_name: str) -> Tracing:
    """OTLP/HTTP export to ``endpoint`` (e.g. ``http://collector:4318/v1/traces``), or off."""
    if not endpoint:
        return Tracing()
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError:
        raise RuntimeError("otlp_endpoint needs OpenTelemetry: pip install 'refusal-guard[otel]'") from None
    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
    return Tracing(provider)
