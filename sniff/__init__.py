"""sniff: a black-box tracer for systems that talk AMQP, SQL and HTTP.

Transparent proxies decode each protocol, tag messages with W3C trace context,
record events to an embedded capture store, and a correlator turns the events
into OpenTelemetry traces.
"""

__version__ = "0.1.0"
