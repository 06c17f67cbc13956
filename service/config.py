"""Settings: the only place that reads the process environment.

boto3 reads the standard AWS variables (keys, region, ``AWS_ENDPOINT_URL_S3``,
profiles) on its own; we only read the ones the service itself must know.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import enum
import ipaddress
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TypeVar

DEFAULT_DATABASE_URL = "sqlite+aiosqlite:///inngest-outbox.db"
DEFAULT_INNGEST_BASE_URL = "http://127.0.0.1:8288"
DEFAULT_EVENT_NAME = "app/document.requested"
KIB = 1024
_E = TypeVar("_E", bound=enum.StrEnum)
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
# A bearer token shorter than this is guessable.
MIN_TOKEN_LENGTH = 16


class Profile(enum.StrEnum):
    DEV = "dev"
    PRODUCTION = "production"


class ConfigError(Exception):
    """The configuration cannot run; the message says what to change."""


@dataclass(frozen=True, slots=True)
class Settings:
    profile: Profile = Profile.PRODUCTION
    database_url: str = DEFAULT_DATABASE_URL
    # 32 raw bytes (aiohttp-session's EncryptedCookieStorage key); never logged.
    session_secret: bytes | None = dataclasses.field(default=None, repr=False)
    session_max_age_seconds: int = 7 * 24 * 3600
    # A session unused for this long is refused (0: only the absolute age counts).
    session_idle_seconds: int = 8 * 3600
    session_cookie_name: str = "inngest_outbox_session"
    # Production's default; from_env makes it False in the dev profile.
    session_cookie_secure: bool = True
    # How long a process trusts its last look at a session row: a logout on
    # another process takes effect here within this many seconds.
    session_check_seconds: float = 5.0
    # How long a process trusts its last look at a relay key: `keys revoke` on
    # another process takes effect here within this many seconds.
    relay_key_check_seconds: float = 5.0
    # A request to POST /e/{key} (an SDK's batch of events) may be this large.
    relay_max_body_bytes: int = 1024 * KIB
    # Failed logins per (username, address) and per address within the window;
    # past them, 429. Per username alone logins only slow down, up to the cap.
    login_max_failures: int = 10
    login_failure_window_seconds: int = 900
    login_slowdown_max_seconds: float = 10.0
    # Peers whose X-Forwarded-For and X-Forwarded-Proto are believed; nobody's by default.
    trusted_proxies: tuple[IPNetwork, ...] = ()
    # Origins (scheme://host[:port]) besides the service's own that may POST.
    allowed_origins: frozenset[str] = frozenset()
    inngest_event_key: str | None = dataclasses.field(default=None, repr=False)
    inngest_base_url: str = DEFAULT_INNGEST_BASE_URL
    inngest_event_name: str = DEFAULT_EVENT_NAME
    inngest_env: str | None = None
    s3_bucket: str | None = None
    s3_check_interval_seconds: float = 60.0
    host: str = "127.0.0.1"
    port: int = 8080
    # /metrics and /readyz's details on a port of their own (on ``host``).
    metrics_port: int | None = None
    # Bearer token that /metrics on the service's port requires; never logged.
    metrics_token: str | None = dataclasses.field(default=None, repr=False)
    max_body_bytes: int = 256 * KIB
    max_event_bytes: int = 256 * KIB
    body_timeout_seconds: float = 30.0
    # An idle connection, or one whose request head has not fully arrived, is
    # closed after this long (aiohttp's keep-alive timer bounds both).
    header_timeout_seconds: float = 75.0
    # Requests waiting for the group-commit writer; past it, 503 at once.
    write_queue_limit: int = 4096
    write_batch_limit: int = 512
    # Delivery worker.
    worker_batch_size: int = 1000
    worker_max_in_flight: int = 4
    worker_lease_seconds: float = 60.0
    worker_poll_seconds: float = 2.0
    worker_linger_seconds: float = 0.02
    retry_base_seconds: float = 1.0
    retry_cap_seconds: float = 300.0
    retry_max_attempts: int = 12
    inngest_timeout_seconds: float = 10.0
    inngest_max_request_bytes: int = 512_000
    inngest_max_batch_events: int = 5000
    shutdown_grace_seconds: float = 10.0
    # Delivered rows older than this are deleted by the worker (0: keep all).
    retention_days: float = 7.0
    retention_batch: int = 1000
    retention_interval_seconds: float = 300.0
    run_worker: bool = True
    access_log: bool = False
    log_level: str = "INFO"
    log_format: str = "text"  # or "json": one object per line

    @classmethod
    def from_env(
        cls, env: Mapping[str, str] | None = None, *, profile: Profile | None = None
    ) -> Settings:
        env = os.environ if env is None else env
        chosen = profile or _enum(env, "INNGEST_OUTBOX_PROFILE", Profile, Profile.PRODUCTION)
        secret_text = env.get("SESSION_SECRET") or None
        production = chosen is Profile.PRODUCTION
        return cls(
            profile=chosen,
            database_url=_database_url(env.get("DATABASE_URL") or DEFAULT_DATABASE_URL),
            session_secret=decode_session_secret(secret_text) if secret_text else None,
            session_max_age_seconds=_int(env, "SESSION_MAX_AGE", 7 * 24 * 3600, 1),
            session_idle_seconds=_int(env, "SESSION_IDLE_SECONDS", 8 * 3600, 0),
            session_cookie_secure=_bool(env, "SESSION_COOKIE_SECURE", production),
            session_check_seconds=_float(env, "SESSION_CHECK_SECONDS", 5.0, 0.0),
            relay_key_check_seconds=_float(env, "RELAY_KEY_CHECK_SECONDS", 5.0, 0.0),
            relay_max_body_bytes=_int(env, "RELAY_MAX_BODY_BYTES", 1024 * KIB, 1024),
            login_max_failures=_int(env, "LOGIN_MAX_FAILURES", 10, 1),
            login_failure_window_seconds=_int(env, "LOGIN_FAILURE_WINDOW_SECONDS", 900, 1),
            login_slowdown_max_seconds=_float(env, "LOGIN_SLOWDOWN_MAX_SECONDS", 10.0, 0.0),
            trusted_proxies=_networks(env, "TRUSTED_PROXIES"),
            allowed_origins=_origins(env.get("ALLOWED_ORIGINS") or ""),
            inngest_event_key=env.get("INNGEST_EVENT_KEY") or None,
            inngest_base_url=(
                env.get("INNGEST_BASE_URL")
                or env.get("INNGEST_EVENT_API_BASE_URL")
                or DEFAULT_INNGEST_BASE_URL
            ).rstrip("/"),
            inngest_event_name=_event_name(env.get("INNGEST_EVENT_NAME") or DEFAULT_EVENT_NAME),
            inngest_env=env.get("INNGEST_ENV") or None,
            s3_bucket=env.get("S3_BUCKET") or None,
            s3_check_interval_seconds=_float(env, "S3_CHECK_INTERVAL", 60.0, 0.05),
            host=env.get("HOST") or "127.0.0.1",
            port=_int(env, "PORT", 8080, 0, 65535),
            metrics_port=_int(env, "METRICS_PORT", 0, 1, 65535) or None,
            metrics_token=_token(env, "METRICS_TOKEN"),
            max_body_bytes=_int(env, "MAX_BODY_BYTES", 256 * KIB, 1024),
            max_event_bytes=_int(env, "MAX_EVENT_BYTES", 256 * KIB, 1024),
            body_timeout_seconds=_float(env, "BODY_TIMEOUT_SECONDS", 30.0, 0.01),
            header_timeout_seconds=_float(env, "HEADER_TIMEOUT_SECONDS", 75.0, 0.01),
            write_queue_limit=_int(env, "WRITE_QUEUE_LIMIT", 4096, 1),
            write_batch_limit=_int(env, "WRITE_BATCH_LIMIT", 512, 1),
            worker_batch_size=_int(env, "WORKER_BATCH_SIZE", 1000, 1),
            worker_max_in_flight=_int(env, "WORKER_MAX_IN_FLIGHT", 4, 1),
            worker_lease_seconds=_float(env, "WORKER_LEASE_SECONDS", 60.0, 0.1),
            worker_poll_seconds=_float(env, "WORKER_POLL_SECONDS", 2.0, 0.01),
            worker_linger_seconds=_float(env, "WORKER_LINGER_SECONDS", 0.02, 0.0),
            retry_base_seconds=_float(env, "RETRY_BASE_SECONDS", 1.0, 0.0),
            retry_cap_seconds=_float(env, "RETRY_CAP_SECONDS", 300.0, 0.0),
            retry_max_attempts=_int(env, "RETRY_MAX_ATTEMPTS", 12, 1),
            inngest_timeout_seconds=_float(env, "INNGEST_TIMEOUT_SECONDS", 10.0, 0.01),
            inngest_max_request_bytes=_int(env, "INNGEST_MAX_REQUEST_BYTES", 512_000, 1024),
            inngest_max_batch_events=_int(env, "INNGEST_MAX_BATCH_EVENTS", 5000, 1, 5000),
            shutdown_grace_seconds=_float(env, "SHUTDOWN_GRACE_SECONDS", 10.0, 0.0),
            retention_days=_float(env, "RETENTION_DAYS", 7.0, 0.0),
            retention_batch=_int(env, "RETENTION_BATCH", 1000, 1),
            retention_interval_seconds=_float(env, "RETENTION_INTERVAL_SECONDS", 300.0, 0.01),
            access_log=_bool(env, "ACCESS_LOG", False),
            log_level=_log_level(env.get("LOG_LEVEL") or "INFO"),
            log_format=_choice(env, "LOG_FORMAT", "text", ("text", "json")),
        )

    def check_production(self) -> None:
        """Refuse to run in production with what only a developer could accept."""
        if self.profile is not Profile.PRODUCTION:
            return
        if self.session_secret is None:
            raise ConfigError(
                "SESSION_SECRET is not set. Production needs a 32-byte key in url-safe base64; "
                "make one with: python3 -c 'import base64,os; "
                "print(base64.urlsafe_b64encode(os.urandom(32)).decode())'"
            )
        if not self.s3_bucket:
            raise ConfigError("S3_BUCKET is not set; production checks the app's S3 credentials.")

    def security_warnings(self) -> list[str]:
        """What a production start-up should say about its weaker choices."""
        if self.profile is not Profile.PRODUCTION:
            return []
        warnings = []
        if not self.session_cookie_secure:
            warnings.append(
                "SESSION_COOKIE_SECURE is false: browsers send the session cookie over plain "
                "HTTP too; serve behind HTTPS and leave it unset"
            )
        if self.metrics_token is None and self.metrics_port is None:
            warnings.append(
                "/metrics is open to anyone who reaches this port; set METRICS_TOKEN or "
                "METRICS_PORT"
            )
        return warnings

    def check_worker(self) -> None:
        if self.profile is Profile.PRODUCTION and not self.inngest_event_key:
            raise ConfigError(
                "INNGEST_EVENT_KEY is not set; the delivery worker needs it "
                "(Inngest's dev server accepts any non-empty key)."
            )

    def replace(self, **changes: object) -> Settings:
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]


def decode_session_secret(text: str) -> bytes:
    try:
        key = base64.urlsafe_b64decode(text.strip().encode("ascii"))
    except (binascii.Error, UnicodeEncodeError, ValueError):
        raise ConfigError("SESSION_SECRET is not url-safe base64.") from None
    if len(key) != 32:
        raise ConfigError(
            f"SESSION_SECRET must decode to 32 bytes, not {len(key)}; "
            "see the README for how to make one."
        )
    return key


def encode_session_secret(key: bytes) -> str:
    return base64.urlsafe_b64encode(key).decode("ascii")


def _networks(env: Mapping[str, str], name: str) -> tuple[IPNetwork, ...]:
    networks = []
    for item in (env.get(name) or "").split(","):
        if not (item := item.strip()):
            continue
        try:
            networks.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise ConfigError(
                f"{name} takes IP addresses or networks (10.0.0.5, 10.0.0.0/24, ::1), not {item!r}."
            ) from None
    return tuple(networks)


def _token(env: Mapping[str, str], name: str) -> str | None:
    token = (env.get(name) or "").strip()
    if not token:
        return None
    if len(token) < MIN_TOKEN_LENGTH or not token.isascii() or not token.isprintable():
        raise ConfigError(
            f"{name} must be at least {MIN_TOKEN_LENGTH} printable ASCII characters; make one "
            "with: python3 -c 'import secrets; print(secrets.token_urlsafe(32))'"
        )
    return token


ASYNC_DRIVERS = {"sqlite": "aiosqlite", "postgresql": "asyncpg"}


def _database_url(raw: str) -> str:
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        url = make_url(raw)
    except ArgumentError:
        raise ConfigError(
            "DATABASE_URL is not an SQLAlchemy URL; for example "
            "sqlite+aiosqlite:///inngest-outbox.db or postgresql+asyncpg://user@host/db"
        ) from None
    backend, driver = url.get_backend_name(), url.get_driver_name()
    if ASYNC_DRIVERS.get(backend) != driver:
        expected = ", ".join(f"{b}+{d}://" for b, d in ASYNC_DRIVERS.items())
        raise ConfigError(
            f"DATABASE_URL must start with one of {expected}, not {backend}+{driver}://"
        )
    return raw


def _choice(env: Mapping[str, str], name: str, default: str, choices: tuple[str, ...]) -> str:
    raw = (env.get(name) or default).strip().lower()
    if raw not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}, not {raw!r}.")
    return raw


def _origins(raw: str) -> frozenset[str]:
    origins = set()
    for item in raw.split(","):
        origin = item.strip().rstrip("/").lower()
        if not origin:
            continue
        scheme, sep, rest = origin.partition("://")
        if scheme not in ("http", "https") or not sep or not rest or "/" in rest:
            raise ConfigError(
                f"ALLOWED_ORIGINS takes origins like https://app.example.com, not {item.strip()!r}."
            )
        origins.add(origin)
    return frozenset(origins)


def _log_level(raw: str) -> str:
    level = raw.strip().upper()
    if level not in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}:
        raise ConfigError(
            f"LOG_LEVEL must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL, not {raw!r}."
        )
    return level


def _event_name(name: str) -> str:
    if name.lower().startswith("inngest/"):
        raise ConfigError("INNGEST_EVENT_NAME may not start with 'inngest/': Inngest reserves it.")
    return name


def _int(env: Mapping[str, str], key: str, default: int, low: int, high: int | None = None) -> int:
    raw = env.get(key)
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{key} must be a whole number, not {raw!r}.") from None
    if value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise ConfigError(f"{key} must be {bound}, not {value}.")
    return value


def _float(env: Mapping[str, str], key: str, default: float, low: float) -> float:
    raw = env.get(key)
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{key} must be a number of seconds, not {raw!r}.") from None
    if not value >= low:
        raise ConfigError(f"{key} must be at least {low}, not {raw}.")
    return value


def _bool(env: Mapping[str, str], key: str, default: bool) -> bool:
    raw = (env.get(key) or "").strip().lower()
    if not raw:
        return default
    if raw in {"1", "true", "yes", "on"}:
        return True
    if raw in {"0", "false", "no", "off"}:
        return False
    raise ConfigError(f"{key} must be true or false, not {raw!r}.")


def _enum(env: Mapping[str, str], key: str, kind: type[_E], default: _E) -> _E:
    raw = env.get(key)
    if not raw:
        return default
    try:
        return kind(raw.lower())
    except ValueError:
        choices = ", ".join(member.value for member in kind)
        raise ConfigError(f"{key} must be one of {choices}, not {raw!r}.") from None
