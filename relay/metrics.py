"""Prometheus metrics, in one registry that ``/metrics`` serves.

Each module adds the metrics it owns here, so every name is defined once and listed in one place.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

REGISTRY = CollectorRegistry()

SMTP_MESSAGES = Counter(
    "relay_smtp_messages_total",
    "Messages received over SMTP, by outcome (sent, partial, refused, deferred)",
    ["outcome"],
    registry=REGISTRY,
)
SMTP_COPIES = Counter(
    "relay_smtp_copies_total",
    "Copies forwarded upstream, by result (sent, failed, deferred, duplicate)",
    ["result"],
    registry=REGISTRY,
)
SMTP_TRACKING = Counter(
    "relay_smtp_tracking_total",
    "Tracking decisions, by what was tracked (opens+clicks, opens, clicks, none)",
    ["tracked"],
    registry=REGISTRY,
)
SMTP_SECONDS = Histogram(
    "relay_smtp_message_seconds",
    "Time from end of DATA to the reply, per message",
    registry=REGISTRY,
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10),
)
