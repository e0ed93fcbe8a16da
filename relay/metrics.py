"""Prometheus metrics, in one registry that ``/metrics`` serves.

Each module adds the metrics it owns here, so every name is defined once and listed in one place.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

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

# The tracking HTTP service (relay/tracking/tracker.py).
HTTP_REQUESTS = Counter(
    "relay_http_requests_total",
    "Tracking HTTP requests, by route (open, click, healthz, metrics) and status code",
    ["route", "status"],
    registry=REGISTRY,
)
HTTP_CONNECTIONS = Gauge(
    "relay_http_connections",
    "HTTP connections open now (admitted under http.max_connections)",
    registry=REGISTRY,
)
HTTP_CONNECTIONS_REFUSED = Counter(
    "relay_http_connections_refused_total",
    "HTTP connections answered 503 and closed at once, by the limit they hit "
    "(total: http.max_connections, per_ip: http.max_connections_per_ip)",
    ["limit"],
    registry=REGISTRY,
)
HTTP_TLS_HANDSHAKE_FAILURES = Counter(
    "relay_http_tls_handshake_failures_total",
    "TLS connections to http.tls_listen whose handshake failed or timed out",
    registry=REGISTRY,
)
HTTP_HEADER_TIMEOUTS = Counter(
    "relay_http_header_timeouts_total",
    "HTTP connections closed because no complete request head came within http.header_timeout",
    registry=REGISTRY,
)
HTTP_MALFORMED = Counter(
    "relay_http_malformed_requests_total",
    "HTTP requests that could not be parsed (answered 400), by aiohttp's error kind",
    ["kind"],
    registry=REGISTRY,
)
TRACKING_EVENTS = Counter(
    "relay_tracking_events_total",
    "Open and click events recorded, by type and classification (person, proxy, prefetch, "
    "scanner, automation); only person and proxy are counted in statistics",
    ["type", "classification"],
    registry=REGISTRY,
)
TRACKING_WRITE_SECONDS = Histogram(
    "relay_tracking_write_seconds",
    "Time from queueing the first hit of a batch to the group commit (one sample per batch)",
    registry=REGISTRY,
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1),
)
TRACKING_WRITE_ERRORS = Counter(
    "relay_tracking_write_errors_total",
    "Hits answered without their event, because the store write failed",
    registry=REGISTRY,
)
STORE_COMMITS = Gauge(
    "relay_store_commits",
    "Group commits since the store was opened (events / commits = mean batch size)",
    registry=REGISTRY,
)
STORE_LAST_BATCH_SIZE = Gauge(
    "relay_store_last_batch_size",
    "Writes in the most recent group commit",
    registry=REGISTRY,
)

# Coroutines awaited before each scrape, to read what gauges show from the store (the loop never
# waits on a store synchronously: PostgreSQL's reads run on threads, relay/store/postgres.py).
BEFORE_SCRAPE: list[Callable[[], Awaitable[None]]] = []

# Tracking domains (relay/admin/domains.py).
TRACKING_DOMAINS = Gauge(
    "relay_tracking_domains",
    "Tracking domains by state (pending, verified, failed), read from the store when scraped",
    ["state"],
    registry=REGISTRY,
)
TRACKING_DOMAIN_CHECKS = Counter(
    "relay_tracking_domain_checks_total",
    "DNS checks of tracking domains, by result (match, wrong: marked failed, outage: state kept)",
    ["result"],
    registry=REGISTRY,
)

# SMTP AUTH and the failed-login budget (relay/smtp/guard.py).
SMTP_AUTH = Counter(
    "relay_smtp_auth_total",
    "AUTH attempts, by result (ok, failed, refused: the client address is in its refusal window, "
    "busy: too many password checks at once, answered 454)",
    ["result"],
    registry=REGISTRY,
)
SMTP_AUTH_BLOCKS = Counter(
    "relay_smtp_auth_blocks_total",
    "Client addresses refused AUTH for smtp.auth_block_seconds after smtp.auth_max_failures "
    "failed logins",
    registry=REGISTRY,
)
SMTP_LIMITS = Counter(
    "relay_smtp_limits_total",
    "SMTP sessions and connections ended by a limit, by limit (errors: too many error replies; "
    "connections, connections_per_ip: refused at connect; data_seconds: an upload over "
    "smtp.max_data_seconds)",
    ["limit"],
    registry=REGISTRY,
)

# Queue mode (relay/smtp/delivery.py; the gauges read from the store when scraped).
QUEUE_DELIVERIES = Counter(
    "relay_queue_deliveries_total",
    "Recipient delivery attempts from the queue, by outcome (sent, retry, permanent: a 5xx, "
    "expired: given up after queue.max_age_hours)",
    ["outcome"],
    registry=REGISTRY,
)
QUEUE_MESSAGES = Gauge(
    "relay_queue_messages",
    "Messages in the queue (not yet delivered to or given up for every recipient)",
    registry=REGISTRY,
)
QUEUE_BYTES = Gauge(
    "relay_queue_bytes",
    "Bytes of the messages in the queue (queue.max_bytes bounds it)",
    registry=REGISTRY,
)
QUEUE_OLDEST_SECONDS = Gauge(
    "relay_queue_oldest_seconds",
    "Age of the oldest message in the queue (0 when empty)",
    registry=REGISTRY,
)
# TLS certificates over ACME (relay/certs/manager.py).
CERTIFICATE_DAYS_LEFT = Gauge(
    "relay_certificate_days_left",
    "Days until each host's certificate expires (negative: expired); renewed at 30",
    ["host"],
    registry=REGISTRY,
)
ACME_ORDERS = Counter(
    "relay_acme_orders_total",
    "Certificate orders by this process, by result (issued, failed)",
    ["result"],
    registry=REGISTRY,
)
