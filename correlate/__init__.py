"""Linking events into spans and traces: pure functions over the event stream.

The same :class:`correlate.engine.Correlator` runs live inside ``sniff run``
(fed by the capture writer's thread) and offline over a capture file.
"""
