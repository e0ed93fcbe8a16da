"""Typed, frozen settings loaded from a TOML file.

``load(path)`` is the only place that reads the configuration; every error names the file,
the key and what is wrong, so a bad config fails at start-up with a clear message.
"""

from __future__ import annotations

import dataclasses
import functools
import ipaddress
import math
import re
import socket
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

from relay.addresses import Network
from relay.errors import ConfigError, InvalidInput
from relay.policy import names
from relay.policy import settings as settings_model
from relay.policy.settings import Domain
from relay.rewrite.dkim import DkimSigner
from relay.rewrite.splice import TRACKING_BASE
from relay.smtp import passwords
from relay.webhooks.payloads import EVENT_TYPES, endpoint_problem


@dataclass(frozen=True)
class Address:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class SmtpUser:
    name: str
    password_hash: str


@functools.cache
def machine_name() -> str:
    """The machine's fully qualified name; a DNS lookup, so asked once per process."""
    return socket.getfqdn()


@dataclass(frozen=True)
class SmtpSettings:
    listen: Address = Address("127.0.0.1", 2525)
    hostname: str | None = None  # None: the machine's fully qualified name (server_name)
    allowed_networks: tuple[Network, ...] = (
        ipaddress.ip_network("127.0.0.0/8"),
        ipaddress.ip_network("::1/128"),
    )
    users: tuple[SmtpUser, ...] = ()
    auth_require_tls: bool = True
    # Failed logins per client address (relay/smtp/guard.py): each past the first answered
    # auth_failure_delay seconds later than the one before; at auth_max_failures the address
    # is refused AUTH for auth_block_seconds.
    auth_max_failures: int = 10
    auth_block_seconds: float = 900.0
    auth_failure_delay: float = 1.0
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_listen: Address | None = None
    max_message_size: int = 25 * 1024 * 1024
    max_recipients: int = 100
    max_line_length: int = 998
    timeout: float = 300.0  # idleness: during DATA, from the last bytes received
    max_data_seconds: float = 3600.0  # a whole upload
    max_connections: int = 1000  # open at once; past it (or the next) new ones get 421
    max_connections_per_ip: int = 50  # per client (IPv6: per /64); allowed_networks exempt
    # A resend of a Message-ID within this many hours skips the recipients it already reached.
    dedupe_hours: float = 72.0
    workers: int = 1  # processes sharing the listeners (SO_REUSEPORT)
    add_received: bool = True  # a Received: line at the top of every copy
    # "proxy": 250 once the upstream took every copy; "queue": 250 once stored (relay/queue/)
    mode: str = "proxy"
    tls_acme: bool = False  # STARTTLS with the ACME certificate of server_name (relay/certs/)

    @property
    def server_name(self) -> str:
        """The relay's name: in its greeting, its EHLO to the upstream, its Received lines."""
        return self.hostname or machine_name()


@dataclass(frozen=True)
class UpstreamSettings:
    host: str | None = None
    port: int = 587
    tls: str = "starttls"  # "none", "starttls" (required), "implicit"
    username: str | None = None
    password: str | None = None
    timeout: float = 60.0
    pool_size: int = 8
    capture_dir: Path | None = Path("./var/outbox")
    verify_certificate: bool = True
    max_rate: float | None = None  # messages (copies) per second at most; None: unlimited


@dataclass(frozen=True)
class QueueSettings:
    """``[queue]``: how queue mode (``smtp.mode = "queue"``) keeps and retries mail."""

    retry_seconds: tuple[float, ...] = (60.0, 300.0, 900.0, 1800.0, 3600.0)  # last repeats
    max_age_hours: float = 72.0  # then a recipient still not delivered is given up (expired)
    max_messages: int = 100000  # queued at once; past it, 452
    max_bytes: int = 10737418240  # of queued messages at once; past it, 452
    bounce_messages: bool = False  # an RFC 3464 report to the sender for given-up recipients


@dataclass(frozen=True)
class HttpSettings:
    listen: Address = Address("127.0.0.1", 8080)
    public_url: str = "http://127.0.0.1:8080"
    trusted_proxies: tuple[Network, ...] = ()
    workers: int = 1  # processes sharing the listener (SO_REUSEPORT)
    # connections per process: past either limit, 503 and close (relay/http_site.py)
    max_connections: int = 10000
    max_connections_per_ip: int = 200  # socket peer (IPv6: per /64); trusted_proxies exempt
    keepalive_timeout: float = 75.0  # idle seconds after a response before closing
    header_timeout: float = 10.0  # seconds a new connection has to send its request head
    # the API and the dashboard on a listener of their own; listen then serves the tracker only
    admin_listen: Address | None = None
    # who may read /metrics (the client address as the tracker sees it, trusted_proxies rule)
    metrics_allowed_networks: tuple[Network, ...] = (
        ipaddress.ip_network("127.0.0.0/8"),
        ipaddress.ip_network("::1/128"),
    )
    # the tracker over TLS, the certificate chosen by SNI (relay/certs/); tls_cert/tls_key:
    # a certificate of your own for the host of public_url
    tls_listen: Address | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None


@dataclass(frozen=True)
class AcmeSettings:
    """``[acme]``: where certificates are ordered (relay/certs/); ``ca_bundle`` verifies a
    private ACME server's own certificate."""

    directory: str
    email: str | None = None
    ca_bundle: Path | None = None


@dataclass(frozen=True)
class StoreSettings:
    """``[store] url``: ``sqlite:///PATH`` (``path`` set) or ``postgresql://...`` (``path`` None,
    ``url`` the libpq connection URI, relay/store/postgres.py)."""

    path: Path | None = Path("./var/relay.db")
    url: str = "sqlite:///./var/relay.db"

    @property
    def engine(self) -> str:
        return "sqlite" if self.path is not None else "postgresql"


@dataclass(frozen=True)
class TrackingSettings:
    opens: bool = False
    clicks: bool = False
    # (key id, secret) pairs; none configured: a key generated once and kept in the store
    keys: tuple[tuple[str, str], ...] = ()
    current_key: str | None = None
    scanner_window_seconds: float = 10.0
    # extra client networks whose hits are link scanners (the shipped list: relay/tracking/bots.py)
    scanner_networks: tuple[Network, ...] = ()
    # hits from one (address, user agent) past flood_hits within flood_seconds are automation
    flood_hits: int = 300  # 0: no flood rule
    flood_seconds: float = 60.0
    # registered tags (X-AliDM-Trace TagName), seeded into the store (relay/admin/settings.py)
    tags: tuple[str, ...] = ()


@dataclass(frozen=True)
class DomainSettings:
    """A ``[[domains]]`` table: the sender domain's settings (the model the store keeps, seeded
    from here once) and its branded tracking host, used once verified (relay/admin/domains.py)."""

    settings: Domain
    tracking_host: str | None = None

    @property
    def name(self) -> str:
        return self.settings.name


@dataclass(frozen=True)
class DnsSettings:
    """How tracking domains are verified: nameservers (none: the system's), per-query timeout,
    seconds between re-checks (0: never)."""

    nameservers: tuple[Address, ...] = ()
    timeout: float = 5.0
    recheck_interval: float = 3600.0


@dataclass(frozen=True)
class DkimKey:
    domain: str
    selector: str
    private_key: bytes


@dataclass(frozen=True)
class WebhookEndpoint:
    """A webhook endpoint: where to POST which events, signed with ``secret``. The
    ``[[webhooks]]`` tables of the file and those added at run time alike."""

    name: str
    url: str
    secret: str = field(repr=False)
    events: tuple[str, ...] = EVENT_TYPES
    allow_private: bool = False  # loopback, private and link-local targets refused otherwise
    timeout: float = 10.0  # seconds per attempt

    def problem(self) -> tuple[str, str] | None:
        """The first field that is wrong and what is wrong with it, or None."""
        return endpoint_problem(self.name, self.url, self.secret, self.events, self.timeout)


@dataclass(frozen=True)
class WebhookDelivery:
    """``[webhook_delivery]``: how the outbox worker sends (relay/webhooks/outbox.py)."""

    concurrency: int = 4  # batches in flight per process
    batch_size: int = 100  # events per POST at most
    poll_seconds: float = 1.0  # how often the store is checked for due batches
    retry_base_seconds: float = 30.0  # first retry; doubled each time, with jitter
    retry_max_seconds: float = 3 * 3600.0  # longest wait between attempts
    retry_hours: float = 24.0  # then a batch is given up (replay resends it)


@dataclass(frozen=True)
class GeoSettings:
    """``[geo]``: a MaxMind-format location database (GeoLite2, DB-IP Lite); none: no location."""

    database: Path | None = None


@dataclass(frozen=True)
class PrivacySettings:
    """``[privacy]``: store IPv4 /24 and IPv6 /48 only (after bot rules and location used it)."""

    anonymize_ip: bool = False


@dataclass(frozen=True)
class RetentionSettings:
    """``[retention]``: purge messages and events older than ``days`` (0: keep forever)."""

    days: int = 0


@dataclass(frozen=True)
class DashboardSettings:
    """``[dashboard]`` (relay/admin/dashboard/): keep each distinct HTML body for the click
    map; how long a sign-in lasts."""

    keep_html: bool = True
    session_hours: float = 12.0


@dataclass(frozen=True)
class Config:
    source: str = "<defaults>"
    smtp: SmtpSettings = field(default_factory=SmtpSettings)
    upstream: UpstreamSettings = field(default_factory=UpstreamSettings)
    queue: QueueSettings = field(default_factory=QueueSettings)
    http: HttpSettings = field(default_factory=HttpSettings)
    store: StoreSettings = field(default_factory=StoreSettings)
    tracking: TrackingSettings = field(default_factory=TrackingSettings)
    domains: tuple[DomainSettings, ...] = ()
    dkim: tuple[DkimKey, ...] = ()
    dns: DnsSettings = field(default_factory=DnsSettings)
    webhooks: tuple[WebhookEndpoint, ...] = ()
    webhook_delivery: WebhookDelivery = field(default_factory=WebhookDelivery)
    geo: GeoSettings = field(default_factory=GeoSettings)
    privacy: PrivacySettings = field(default_factory=PrivacySettings)
    retention: RetentionSettings = field(default_factory=RetentionSettings)
    dashboard: DashboardSettings = field(default_factory=DashboardSettings)
    acme: AcmeSettings | None = None
    log_level: str = "INFO"

    def dkim_key(self, domain: str) -> DkimKey | None:
        domain = domain.lower()
        return next((k for k in self.dkim if k.domain == domain), None)


_T = TypeVar("_T")


class _Reader:
    """Reads one table of the TOML document, naming ``file`` and the dotted key in errors."""

    def __init__(self, file: str, table: dict[str, Any], prefix: str, base: Path) -> None:
        self.file, self.table, self.prefix, self.base = file, table, prefix, base
        self.seen: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self.prefix}.{name}" if self.prefix else name

    def fail(self, name: str, problem: str) -> ConfigError:
        return ConfigError(self.file, self.key(name), problem)

    def get(self, name: str, kind: type | tuple[type, ...], default: Any) -> Any:
        self.seen.add(name)
        if name not in self.table:
            return default
        value = self.table[name]
        if isinstance(value, bool) and kind in (int, float, (int, float)):
            raise self.fail(name, f"expected a number, got {_shown(name, value)}")
        if not isinstance(value, kind):
            expected = kind.__name__ if isinstance(kind, type) else "a number"
            raise self.fail(name, f"expected {expected}, got {_shown(name, value)}")
        if isinstance(value, float) and not math.isfinite(value):
            # TOML's nan and inf compare false with every bound: they would pass as "on" and
            # turn dedupe, timeouts and limits off silently
            raise self.fail(name, f"expected a finite number, got {value}")
        return value

    def positive(self, name: str, default: float, kind: type = int) -> Any:
        value = self.get(name, (int, float) if kind is float else int, default)
        if value <= 0:
            raise self.fail(name, f"must be greater than 0, got {value}")
        return kind(value)

    def address(self, name: str, default: Address | None) -> Address | None:
        text = self.get(name, str, None)
        if text is None:
            return default
        host, sep, port = text.rpartition(":")
        host = host.strip("[]")
        if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
            raise self.fail(name, f"expected HOST:PORT, got {text!r}")
        return Address(host, int(port))

    def networks(self, name: str, default: tuple[Network, ...]) -> tuple[Network, ...]:
        items = self.get(name, list, None)
        if items is None:
            return default
        nets = []
        for item in items:
            try:
                nets.append(_unmapped(ipaddress.ip_network(str(item), strict=False)))
            except ValueError:
                raise self.fail(name, f"not an IP network: {item!r}") from None
        return tuple(nets)

    def path(self, name: str, default: Path | None) -> Path | None:
        text = self.get(name, str, None)
        if text is None:
            return default
        path = Path(text)
        return path if path.is_absolute() else self.base / path

    def sub(self, name: str) -> _Reader:
        table = self.get(name, dict, {})
        return _Reader(self.file, table, self.key(name), self.base)

    def subs(self, name: str) -> list[_Reader]:
        items = self.get(name, list, [])
        readers = []
        for index, item in enumerate(items):
            if not isinstance(item, dict):
                raise self.fail(f"{name}[{index}]", "expected a table")
            readers.append(_Reader(self.file, item, f"{self.key(name)}[{index}]", self.base))
        return readers

    def checked(self, name: str, validate: Callable[..., _T], *args: Any) -> _T:
        """``validate(*args)``, its :class:`InvalidInput` named as this file's key ``name``
        (or the field the error names, below this table)."""
        try:
            return validate(*args)
        except InvalidInput as exc:
            raise self.fail(exc.key or name, exc.problem) from None

    def done(self) -> None:
        unknown = sorted(set(self.table) - self.seen)
        if unknown:
            raise self.fail(unknown[0], "unknown setting")


def is_secret(name: str) -> bool:
    """Whether the setting ``name`` (its last key) holds a secret: a password or its hash, a
    signing secret, tracking key material, a DKIM private key."""
    return "password" in name or "secret" in name or name in ("keys", "private_key")


def _shown(name: str, value: Any) -> str:
    """A wrong value as errors show it: its type, and the value itself unless the setting
    holds a secret."""
    return type(value).__name__ if is_secret(name) else f"{type(value).__name__} {value!r}"


def load(path: str | Path) -> Config:
    """Read and validate a config file; relative paths in it are relative to its folder."""
    file = str(path)
    try:
        document = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(file, "-", "file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(file, "-", f"cannot read: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(file, "-", f"not valid TOML: {exc}") from None
    return parse(document, file, Path(path).resolve().parent)


def parse(document: dict[str, Any], file: str = "<config>", base: Path = Path(".")) -> Config:
    root = _Reader(file, document, "", base)
    config = Config(
        source=file,
        smtp=_smtp(root.sub("smtp")),
        upstream=_upstream(root.sub("upstream")),
        queue=_queue(root.sub("queue")),
        http=_http(root.sub("http")),
        store=_store(root.sub("store")),
        tracking=_tracking(root.sub("tracking")),
        domains=_named(root.subs("domains"), _domain, "domains"),
        dkim=tuple(_dkim(r) for r in root.subs("dkim")),
        dns=_dns(root.sub("dns")),
        webhooks=_named(root.subs("webhooks"), _webhook, "webhooks"),
        webhook_delivery=_webhook_delivery(root.sub("webhook_delivery")),
        geo=_geo(root.sub("geo")),
        privacy=_privacy(root.sub("privacy")),
        retention=_retention(root.sub("retention")),
        dashboard=_dashboard(root.sub("dashboard")),
        acme=_acme(root),
        log_level=_log_level(root.sub("logging")),
    )
    root.done()
    _tls_sources(root, config)
    return config


def _smtp(r: _Reader) -> SmtpSettings:
    d = SmtpSettings()
    users = []
    for u in r.subs("users"):
        name = u.get("name", str, None)
        password_hash = u.get("password_hash", str, None)
        if not name:
            raise u.fail("name", "required")
        _password_hash(u, password_hash)
        u.done()
        users.append(SmtpUser(name, password_hash))
    settings = SmtpSettings(
        listen=r.address("listen", d.listen),
        hostname=_host_name(r, "hostname"),
        allowed_networks=r.networks("allowed_networks", d.allowed_networks),
        users=tuple(users),
        auth_require_tls=r.get("auth_require_tls", bool, d.auth_require_tls),
        auth_max_failures=r.positive("auth_max_failures", d.auth_max_failures),
        auth_block_seconds=r.positive("auth_block_seconds", d.auth_block_seconds, float),
        auth_failure_delay=_non_negative(r, "auth_failure_delay", d.auth_failure_delay),
        tls_cert=r.path("tls_cert", None),
        tls_key=r.path("tls_key", None),
        tls_listen=r.address("tls_listen", None),
        max_message_size=r.positive("max_message_size", d.max_message_size),
        max_recipients=r.positive("max_recipients", d.max_recipients),
        max_line_length=r.positive("max_line_length", d.max_line_length),
        timeout=r.positive("timeout", d.timeout, float),
        max_data_seconds=r.positive("max_data_seconds", d.max_data_seconds, float),
        max_connections=r.positive("max_connections", d.max_connections),
        max_connections_per_ip=r.positive("max_connections_per_ip", d.max_connections_per_ip),
        dedupe_hours=_non_negative(r, "dedupe_hours", d.dedupe_hours),
        workers=_workers(r, r.address("listen", d.listen)),
        add_received=r.get("add_received", bool, d.add_received),
        mode=_choice(r, "mode", _SMTP_MODES, d.mode),
        tls_acme=r.get("tls_acme", bool, d.tls_acme),
    )
    _cert_files(r, settings.tls_cert, settings.tls_key)
    if settings.tls_acme and settings.tls_cert is not None:
        raise r.fail("tls_acme", "set either tls_acme or tls_cert/tls_key, not both")
    if settings.tls_listen and settings.tls_cert is None and not settings.tls_acme:
        raise r.fail("tls_listen", "needs tls_cert and tls_key, or tls_acme")
    r.done()
    return settings


def _cert_files(r: _Reader, cert: Path | None, key: Path | None) -> None:
    if (cert is None) != (key is None):
        raise r.fail("tls_cert", "tls_cert and tls_key go together")
    for name, value in (("tls_cert", cert), ("tls_key", key)):
        if value is not None and not value.is_file():
            raise r.fail(name, f"no such file: {value}")


def _host_name(r: _Reader, key: str) -> str | None:
    text = r.get(key, str, None)
    if text is None:
        return None
    return r.checked(key, names.host_name, text)


def _password_hash(r: _Reader, encoded: str | None) -> None:
    if not encoded:
        raise r.fail("password_hash", "required: the output of `relay hash-password`")
    try:
        passwords.parse_hash(encoded)
    except ValueError as exc:  # the message never quotes the hash
        raise r.fail("password_hash", f"not the output of `relay hash-password`: {exc}") from None


def _workers(r: _Reader, listen: Address | None) -> int:
    workers = r.positive("workers", 1)
    if workers > 1 and listen is not None and listen.port == 0:
        raise r.fail("workers", "several workers need a fixed listen port, not 0")
    return workers


def _non_negative(r: _Reader, name: str, default: float, kind: type = float) -> Any:
    value = r.get(name, int if kind is int else (int, float), default)
    if value < 0:
        raise r.fail(name, "must be 0 (off) or more")
    return kind(value)


_UPSTREAM_TLS = ("none", "starttls", "implicit")


def _upstream(r: _Reader) -> UpstreamSettings:
    d = UpstreamSettings()
    host = r.get("host", str, None)
    capture = r.path("capture_dir", None)
    if host and capture:
        raise r.fail("capture_dir", "set either host (a real upstream) or capture_dir, not both")
    tls = r.get("tls", str, d.tls)
    if tls not in _UPSTREAM_TLS:
        raise r.fail("tls", f"expected one of {', '.join(_UPSTREAM_TLS)}, got {tls!r}")
    port = r.get("port", int, d.port)
    if not 0 < port < 65536:
        raise r.fail("port", f"not a port: {port}")
    settings = UpstreamSettings(
        host=host or None,
        port=port,
        tls=tls,
        username=r.get("username", str, None),
        password=r.get("password", str, None),
        timeout=r.positive("timeout", d.timeout, float),
        pool_size=r.positive("pool_size", d.pool_size),
        capture_dir=None if host else (capture or d.capture_dir),
        verify_certificate=r.get("verify_certificate", bool, d.verify_certificate),
        max_rate=r.positive("max_rate", 1.0, float) if "max_rate" in r.table else None,
    )
    if (settings.username is None) != (settings.password is None):
        raise r.fail("username", "username and password go together")
    r.done()
    return settings


_SMTP_MODES = ("proxy", "queue")


def _choice(r: _Reader, name: str, choices: tuple[str, ...], default: str) -> str:
    value = r.get(name, str, default)
    if value not in choices:
        raise r.fail(name, f"expected one of {', '.join(choices)}, got {value!r}")
    return value


def _queue(r: _Reader) -> QueueSettings:
    d = QueueSettings()
    retry = r.get("retry_seconds", list, None)
    if retry is not None and (not retry or any(
            isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v)
            or v <= 0 for v in retry)):
            raise r.fail("retry_seconds", "expected a non-empty list of numbers of seconds, "
                                          "each greater than 0")
    settings = QueueSettings(
        retry_seconds=tuple(float(v) for v in retry) if retry is not None else d.retry_seconds,
        max_age_hours=r.positive("max_age_hours", d.max_age_hours, float),
        max_messages=r.positive("max_messages", d.max_messages),
        max_bytes=r.positive("max_bytes", d.max_bytes),
        bounce_messages=r.get("bounce_messages", bool, d.bounce_messages),
    )
    r.done()
    return settings


def _http(r: _Reader) -> HttpSettings:
    d = HttpSettings()
    settings = HttpSettings(
        listen=r.address("listen", d.listen),
        public_url=_public_url(r, r.get("public_url", str, d.public_url).rstrip("/")),
        trusted_proxies=r.networks("trusted_proxies", d.trusted_proxies),
        workers=_workers(r, r.address("listen", d.listen)),
        max_connections=r.positive("max_connections", d.max_connections),
        max_connections_per_ip=r.positive("max_connections_per_ip", d.max_connections_per_ip),
        keepalive_timeout=r.positive("keepalive_timeout", d.keepalive_timeout, float),
        header_timeout=r.positive("header_timeout", d.header_timeout, float),
        admin_listen=r.address("admin_listen", d.admin_listen),
        metrics_allowed_networks=r.networks("metrics_allowed_networks",
                                            d.metrics_allowed_networks),
        tls_listen=r.address("tls_listen", None),
        tls_cert=r.path("tls_cert", None),
        tls_key=r.path("tls_key", None),
    )
    _cert_files(r, settings.tls_cert, settings.tls_key)
    if settings.tls_cert is not None and settings.tls_listen is None:
        raise r.fail("tls_cert", "needs tls_listen, the address the TLS listener takes")
    if settings.tls_listen is not None and settings.tls_listen.port == 0:
        raise r.fail("tls_listen", "needs a fixed port: tracking links name it")
    r.done()
    return settings


def _public_url(r: _Reader, url: str) -> str:
    """The tracking base URL: what relay/rewrite/splice.py builds links on (TRACKING_BASE)."""
    parts = urlsplit(url)
    if "@" in parts.netloc:  # checked first: the error must not quote the password
        raise r.fail("public_url", "a user name or password has no place in the tracking URL")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise r.fail("public_url", f"expected an http(s) URL, got {url!r}")
    for separator, part in (("?", "query"), ("#", "fragment")):
        if separator in url:
            raise r.fail("public_url", f"a {part} ({separator}...) has no place in the tracking "
                                       "URL: links are built by appending to it")
    try:
        port = parts.port
    except ValueError:
        port = 0
    if port == 0:
        raise r.fail("public_url", f"not a port (1-65535): {parts.netloc.rpartition(':')[2]!r}")
    if not TRACKING_BASE.fullmatch(url):
        raise r.fail("public_url", f"expected http(s)://HOST[:PORT][/PATH] with a path of "
                                   f"letters, digits and . _ ~ / -, got {url!r}")
    return url


def _store(r: _Reader) -> StoreSettings:
    url = r.get("url", str, StoreSettings().url)
    r.done()
    return store_settings(url, r.file, r.key("url"), r.base)


def store_settings(url: str, file: str, key: str, base: Path) -> StoreSettings:
    """The store a URL names (a relative SQLite path is taken from ``base``); ConfigError
    naming ``file`` and ``key`` when it names none."""
    if url.startswith(("postgresql://", "postgres://")):
        problem = postgres_url_problem(url)
        if problem:
            raise ConfigError(file, key, problem)
        return StoreSettings(None, url)
    if not url.startswith("sqlite:///") or url == "sqlite:///":
        raise ConfigError(file, key, f"expected sqlite:///PATH or "
                                     f"postgresql://[USER@]HOST[:PORT]/DB, got {redact_url(url)!r}")
    path = Path(url[len("sqlite:///"):])
    path = path if path.is_absolute() else base / path
    return StoreSettings(path, f"sqlite:///{path}")


def postgres_url_problem(url: str) -> str | None:
    """What is wrong with a ``postgresql://`` URI (None: nothing), without echoing a password."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018  (raises on a port that is not a number)
    except ValueError as exc:
        return f"not a PostgreSQL URI ({exc}): {redact_url(url)!r}"
    if not parts.path.strip("/"):
        return f"the URI names no database (postgresql://HOST/DB): {redact_url(url)!r}"
    if parts.fragment:
        return f"a PostgreSQL URI has no #fragment: {redact_url(url)!r}"
    return None


def redact_url(url: str) -> str:
    """``url`` with the password of its userinfo replaced by ``***`` (for errors and logs)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


def _acme(root: _Reader) -> AcmeSettings | None:
    if "acme" not in root.table:
        root.seen.add("acme")
        return None
    r = root.sub("acme")
    directory = r.get("directory", str, None)
    if directory is None:
        raise r.fail("directory", "required: the ACME server's directory URL")
    parts = urlsplit(directory)
    if parts.scheme != "https" or not parts.hostname:
        raise r.fail("directory", f"expected an https:// URL, got {directory!r}")
    email = r.get("email", str, None)
    if email is not None and not re.fullmatch(r"[^@\s:]+@[^@\s:]+\.[^@\s:]+", email):
        raise r.fail("email", f"expected an email address, got {email!r}")
    ca_bundle = r.path("ca_bundle", None)
    if ca_bundle is not None and not ca_bundle.is_file():
        raise r.fail("ca_bundle", f"no such file: {ca_bundle}")
    r.done()
    return AcmeSettings(directory, email, ca_bundle)


def _tls_sources(root: _Reader, config: Config) -> None:
    """Settings that need another table: a TLS listener needs a certificate from somewhere."""
    http, acme = config.http, config.acme
    if http.tls_listen is not None and http.tls_cert is None and acme is None:
        raise root.fail("http.tls_listen", "needs http.tls_cert and http.tls_key, or [acme]")
    if config.smtp.tls_acme and acme is None:
        raise root.fail("smtp.tls_acme", "needs an [acme] table")


_KEY_ID = re.compile(r"[A-Za-z0-9_-]{1,16}")


def _tracking(r: _Reader) -> TrackingSettings:
    d = TrackingSettings()
    keys_table = r.get("keys", dict, {})
    keys = []
    for kid, secret in keys_table.items():
        if not _KEY_ID.fullmatch(kid):
            raise r.fail(f"keys.{kid}", "key ids are 1-16 letters, digits, '-' or '_'")
        if not isinstance(secret, str) or len(secret) < 32:
            raise r.fail(f"keys.{kid}", "the secret must be a string of at least 32 characters")
        keys.append((kid, secret))
    current = r.get("current_key", str, keys[-1][0] if keys else None)
    if keys and current not in dict(keys):
        raise r.fail("current_key", f"no key {current!r} in tracking.keys")
    window = _non_negative(r, "scanner_window_seconds", d.scanner_window_seconds)
    settings = TrackingSettings(
        opens=r.get("opens", bool, d.opens),
        clicks=r.get("clicks", bool, d.clicks),
        keys=tuple(keys),
        current_key=current,
        scanner_window_seconds=window,
        scanner_networks=r.networks("scanner_networks", d.scanner_networks),
        flood_hits=_non_negative(r, "flood_hits", d.flood_hits, int),
        flood_seconds=r.positive("flood_seconds", d.flood_seconds, float),
        tags=_tags(r),
    )
    r.done()
    return settings


def _domain(r: _Reader) -> DomainSettings:
    """Validated as ``relay settings set`` and the API validate them (relay/policy/settings.py)."""
    name = _domain_name(r, "name", r.get("name", str, None))
    domain = r.checked("exclude_hosts", settings_model.domain, name, r.get("opens", bool, None),
                       r.get("clicks", bool, None), r.get("exclude_hosts", list, []))
    host = r.get("tracking_host", str, None)
    entry = DomainSettings(domain, None if host is None else
                           r.checked("tracking_host", names.tracking_host, host, name))
    r.done()
    return entry


def _domain_name(r: _Reader, key: str, text: str | None) -> str:
    if not text:
        raise r.fail(key, "required")
    return r.checked(key, names.domain_name, text)


def _tags(r: _Reader) -> tuple[str, ...]:
    return tuple(dict.fromkeys(r.checked("tags", names.tag_name, str(t))
                               for t in r.get("tags", list, [])))


def _dns(r: _Reader) -> DnsSettings:
    d = DnsSettings()
    servers = []
    for index, text in enumerate(r.get("nameservers", list, [])):
        address = _nameserver(str(text))
        if address is None:
            raise r.fail(f"nameservers[{index}]", f"expected IP or IP:PORT, got {text!r}")
        servers.append(address)
    settings = DnsSettings(
        nameservers=tuple(servers),
        timeout=r.positive("timeout", d.timeout, float),
        recheck_interval=_non_negative(r, "recheck_interval", d.recheck_interval),
    )
    r.done()
    return settings


def _nameserver(text: str) -> Address | None:
    """``IP``, ``IP:PORT`` or ``[IPv6]:PORT``."""
    host, port = text, "53"
    if text.startswith("["):
        host, _, port = text[1:].partition("]:")
    elif text.count(":") == 1:
        host, _, port = text.partition(":")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return None
    return Address(host, int(port)) if port.isdigit() and 0 < int(port) < 65536 else None


def _dkim(r: _Reader) -> DkimKey:
    domain = _domain_name(r, "domain", r.get("domain", str, None))
    selector = _selector(r, r.get("selector", str, ""))
    key_file = r.path("private_key_file", None)
    if key_file is None:
        raise r.fail("private_key_file", "required")
    try:
        key = key_file.read_bytes()
    except OSError as exc:
        raise r.fail("private_key_file", f"cannot read {key_file}: {exc.strerror}") from None
    if not DkimSigner(domain, selector, key).usable():  # never quotes the file's content
        raise r.fail("private_key_file", f"{key_file} is not an RSA private key in PEM form "
                                         "(PKCS#1 or PKCS#8) that signs")
    r.done()
    return DkimKey(domain, selector, key)


def _selector(r: _Reader, text: str) -> str:
    if not text.strip():
        raise r.fail("selector", "required")
    return r.checked("selector", names.dkim_selector, text)


_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")


def _unmapped(net: Network) -> Network:
    """An IPv4-mapped range (``::ffff:198.51.100.0/120``) as the IPv4 range it is: client
    addresses are compared unwrapped (relay.addresses.parse_ip), and would never fall inside
    it."""
    if isinstance(net, ipaddress.IPv6Network) and net.prefixlen >= 96 and net.subnet_of(_MAPPED):
        return ipaddress.IPv4Network((int(net.network_address) & 0xFFFFFFFF, net.prefixlen - 96))
    return net


_Named = TypeVar("_Named", "DomainSettings", "WebhookEndpoint")


def _named(readers: list[_Reader], read: Callable[[_Reader], _Named], table: str
           ) -> tuple[_Named, ...]:
    """The entries of an array of tables, each with a name no other entry has."""
    entries: list[_Named] = []
    for r in readers:
        entry = read(r)
        if any(e.name == entry.name for e in entries):
            raise r.fail("name", f"another [[{table}]] table is named {entry.name!r}")
        entries.append(entry)
    return tuple(entries)


def _webhook(r: _Reader) -> WebhookEndpoint:
    """Checked as ``relay webhooks add`` and the API check an endpoint
    (relay/webhooks/payloads.py's endpoint_problem)."""
    events = r.get("events", list, list(EVENT_TYPES))
    settings = WebhookEndpoint(
        name=r.get("name", str, ""), url=r.get("url", str, ""), secret=r.get("secret", str, ""),
        events=tuple(events), allow_private=r.get("allow_private", bool, False),
        timeout=r.positive("timeout", WebhookEndpoint.timeout, float))
    found = settings.problem()
    if found:
        key, problem = found
        raise r.fail(key, "required" if key == "secret" and not settings.secret else problem)
    r.done()
    return replace(settings, events=tuple(dict.fromkeys(events)))


def _webhook_delivery(r: _Reader) -> WebhookDelivery:
    d = WebhookDelivery()
    settings = WebhookDelivery(
        concurrency=r.positive("concurrency", d.concurrency),
        batch_size=r.positive("batch_size", d.batch_size),
        poll_seconds=r.positive("poll_seconds", d.poll_seconds, float),
        retry_base_seconds=r.positive("retry_base_seconds", d.retry_base_seconds, float),
        retry_max_seconds=r.positive("retry_max_seconds", d.retry_max_seconds, float),
        retry_hours=r.positive("retry_hours", d.retry_hours, float),
    )
    r.done()
    return settings


def _geo(r: _Reader) -> GeoSettings:
    database = r.path("database", None)
    if database is not None and not database.is_file():
        raise r.fail("database", f"no such file: {database}")
    r.done()
    return GeoSettings(database)


def _privacy(r: _Reader) -> PrivacySettings:
    settings = PrivacySettings(anonymize_ip=r.get("anonymize_ip", bool, False))
    r.done()
    return settings


def _retention(r: _Reader) -> RetentionSettings:
    days = r.get("days", int, 0)
    if days < 0:
        raise r.fail("days", "must be 0 (keep forever) or more")
    r.done()
    return RetentionSettings(days)


def _dashboard(r: _Reader) -> DashboardSettings:
    d = DashboardSettings()
    settings = DashboardSettings(
        keep_html=r.get("keep_html", bool, d.keep_html),
        session_hours=r.positive("session_hours", d.session_hours, float),
    )
    r.done()
    return settings


_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def _log_level(r: _Reader) -> str:
    level = r.get("level", str, "INFO").upper()
    if level not in _LEVELS:
        raise r.fail("level", f"expected one of {', '.join(_LEVELS)}")
    r.done()
    return level


HIDDEN = "(set, not shown)"


def effective_settings(config: Config) -> list[tuple[str, str]]:
    """Every setting in force, defaults included, as (dotted key, value as text), in the
    order of the file's sections (the dashboard's operations page). Secrets (:func:`is_secret`)
    show only that they are set, and a PostgreSQL URL without its password (userinfo or a
    ``password`` parameter)."""
    shown: list[tuple[str, str]] = []

    def walk(key: str, value: Any) -> None:
        if dataclasses.is_dataclass(value) and not isinstance(value, Address):
            for f in dataclasses.fields(value):
                walk(f"{key}.{f.name}" if key else f.name, getattr(value, f.name))
        elif isinstance(value, tuple) and value and dataclasses.is_dataclass(value[0]):
            for index, item in enumerate(value):
                walk(f"{key}[{index}]", item)
        elif is_secret(key.rpartition(".")[2]):
            shown.append((key, HIDDEN if value else "not set"))
        elif key == "store.url":  # as written (sqlite:////abs keeps its four slashes)
            url = redact_url(value)
            parts = urlsplit(url)
            shown.append((key, urlunsplit(parts._replace(query="")) if "password" in
                          parts.query.lower() else url))
        else:
            shown.append((key, _text(value)))

    for f in dataclasses.fields(config):
        if f.name != "source":
            walk(f.name, getattr(config, f.name))
    return shown


def _text(value: Any) -> str:
    if value is None:
        return "not set"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return ", ".join(map(_text, value)) or "none"
    return str(value)
