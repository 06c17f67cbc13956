"""Settings from the environment, and what production refuses."""

from __future__ import annotations

import base64
import os

import pytest

from service.config import (
    DEFAULT_DATABASE_URL,
    ConfigError,
    Profile,
    Settings,
    decode_session_secret,
)

SECRET = base64.urlsafe_b64encode(os.urandom(32)).decode()


def test_defaults() -> None:
    settings = Settings.from_env({})
    assert settings.profile is Profile.PRODUCTION
    assert settings.database_url == DEFAULT_DATABASE_URL == "sqlite+aiosqlite:///inngest-outbox.db"
    assert settings.inngest_base_url == "http://127.0.0.1:8288"
    assert settings.inngest_event_name == "app/document.requested"
    assert (settings.host, settings.port) == ("127.0.0.1", 8080)
    assert settings.max_body_bytes == settings.max_event_bytes == 256 * 1024
    assert settings.session_secret is None


def test_values_from_the_environment() -> None:
    settings = Settings.from_env(
        {
            "DATABASE_URL": "postgresql+asyncpg://u@db/outbox",
            "SESSION_SECRET": SECRET,
            "INNGEST_EVENT_KEY": "key",
            "INNGEST_BASE_URL": "https://inn.gs/",
            "INNGEST_EVENT_NAME": "shop/document.requested",
            "S3_BUCKET": "docs",
            "HOST": "0.0.0.0",
            "PORT": "9000",
            "MAX_BODY_BYTES": "2048",
            "SESSION_COOKIE_SECURE": "true",
            "ACCESS_LOG": "yes",
        }
    )
    assert settings.database_url == "postgresql+asyncpg://u@db/outbox"
    assert settings.session_secret == base64.urlsafe_b64decode(SECRET)
    assert settings.inngest_base_url == "https://inn.gs"
    assert settings.inngest_event_name == "shop/document.requested"
    assert (settings.host, settings.port, settings.max_body_bytes) == ("0.0.0.0", 9000, 2048)
    assert settings.session_cookie_secure is True
    assert settings.access_log is True


def test_inngest_sdk_base_url_name_is_accepted() -> None:
    settings = Settings.from_env({"INNGEST_EVENT_API_BASE_URL": "http://127.0.0.1:9999"})
    assert settings.inngest_base_url == "http://127.0.0.1:9999"


def test_secrets_are_not_in_repr() -> None:
    settings = Settings.from_env({"SESSION_SECRET": SECRET, "INNGEST_EVENT_KEY": "sekrit-key"})
    assert SECRET not in repr(settings)
    assert "sekrit-key" not in repr(settings)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"SESSION_SECRET": "c2hvcnQ="}, "SESSION_SECRET must decode to 32 bytes, not 5"),
        ({"SESSION_SECRET": "!!!notbase64!!!"}, "SESSION_SECRET is not url-safe base64."),
        ({"PORT": "http"}, "PORT must be a whole number, not 'http'."),
        ({"PORT": "70000"}, "PORT must be between 0 and 65535, not 70000."),
        ({"MAX_BODY_BYTES": "10"}, "MAX_BODY_BYTES must be at least 1024, not 10."),
        ({"SESSION_COOKIE_SECURE": "maybe"}, "SESSION_COOKIE_SECURE must be true or false"),
        ({"INNGEST_EVENT_NAME": "Inngest/x"}, "INNGEST_EVENT_NAME may not start with 'inngest/'"),
        ({"S3_CHECK_INTERVAL": "soon"}, "S3_CHECK_INTERVAL must be a number of seconds"),
        ({"INNGEST_OUTBOX_PROFILE": "staging"}, "INNGEST_OUTBOX_PROFILE must be one of dev"),
        ({"LOG_FORMAT": "xml"}, "LOG_FORMAT must be one of text, json, not 'xml'."),
        ({"LOGIN_MAX_FAILURES": "0"}, "LOGIN_MAX_FAILURES must be at least 1, not 0."),
        ({"METRICS_PORT": "0"}, "METRICS_PORT must be between 1 and 65535, not 0."),
        ({"METRICS_TOKEN": "short"}, "METRICS_TOKEN must be at least 16 printable ASCII"),
        ({"METRICS_TOKEN": "x" * 15 + "\u00e9"}, "METRICS_TOKEN must be at least 16 printable"),
        (
            {"TRUSTED_PROXIES": "10.0.0.1, proxy.internal"},
            "TRUSTED_PROXIES takes IP addresses or networks (10.0.0.5, 10.0.0.0/24, ::1), "
            "not 'proxy.internal'.",
        ),
        (
            {"ALLOWED_ORIGINS": "app.example.com"},
            "ALLOWED_ORIGINS takes origins like https://app.example.com, not 'app.example.com'.",
        ),
        (
            {"ALLOWED_ORIGINS": "https://a.example/path"},
            "ALLOWED_ORIGINS takes origins like https://app.example.com, not "
            "'https://a.example/path'.",
        ),
    ],
)
def test_bad_values_are_refused_clearly(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        Settings.from_env(env)
    assert str(caught.value).startswith(message)


def test_production_needs_a_session_secret() -> None:
    with pytest.raises(ConfigError, match="SESSION_SECRET is not set"):
        Settings.from_env({"S3_BUCKET": "b"}).check_production()


def test_production_needs_a_bucket() -> None:
    with pytest.raises(ConfigError, match="S3_BUCKET is not set"):
        Settings.from_env({"SESSION_SECRET": SECRET}).check_production()


def test_production_with_both_is_accepted() -> None:
    Settings.from_env({"SESSION_SECRET": SECRET, "S3_BUCKET": "b"}).check_production()


def test_dev_profile_does_not_check_production_rules() -> None:
    Settings.from_env({}, profile=Profile.DEV).check_production()


def test_secret_with_surrounding_whitespace_is_accepted() -> None:
    assert len(decode_session_secret(f"  {SECRET}\n")) == 32


def test_allowed_origins_are_normalised() -> None:
    settings = Settings.from_env({"ALLOWED_ORIGINS": " https://A.example/ , http://b.example:8080"})
    assert settings.allowed_origins == {"https://a.example", "http://b.example:8080"}
    assert Settings.from_env({}).allowed_origins == frozenset()
    assert Settings.from_env({}).login_max_failures == 10
    assert Settings.from_env({}).login_failure_window_seconds == 900


def test_no_proxy_is_trusted_unless_listed() -> None:
    assert Settings.from_env({}).trusted_proxies == ()
    listed = Settings.from_env({"TRUSTED_PROXIES": " 10.0.0.5, 10.1.0.0/16 ,::1"}).trusted_proxies
    assert [str(network) for network in listed] == ["10.0.0.5/32", "10.1.0.0/16", "::1/128"]


def test_production_cookies_are_secure_unless_the_operator_says_otherwise() -> None:
    assert Settings.from_env({}).session_cookie_secure is True
    assert Settings.from_env({}, profile=Profile.DEV).session_cookie_secure is False
    plain = Settings.from_env({"SESSION_COOKIE_SECURE": "false"})
    assert plain.session_cookie_secure is False
    assert any("SESSION_COOKIE_SECURE is false" in w for w in plain.security_warnings())
    assert not any("SESSION_COOKIE_SECURE" in w for w in Settings.from_env({}).security_warnings())
    assert Settings.from_env({}, profile=Profile.DEV).security_warnings() == []


def test_sessions_have_an_idle_timeout() -> None:
    assert Settings.from_env({}).session_idle_seconds == 8 * 3600
    assert Settings.from_env({"SESSION_IDLE_SECONDS": "600"}).session_idle_seconds == 600
    assert Settings.from_env({"SESSION_IDLE_SECONDS": "0"}).session_idle_seconds == 0


def test_open_metrics_in_production_are_warned_about() -> None:
    warning = "/metrics is open to anyone who reaches this port; set METRICS_TOKEN or METRICS_PORT"
    assert warning in Settings.from_env({}).security_warnings()
    for closed in ({"METRICS_TOKEN": "t" * 16}, {"METRICS_PORT": "9100"}):
        assert warning not in Settings.from_env(closed).security_warnings()


def test_the_metrics_token_is_not_in_repr() -> None:
    settings = Settings.from_env({"METRICS_TOKEN": "metrics-sekrit-0123456789"})
    assert settings.metrics_token == "metrics-sekrit-0123456789"
    assert "metrics-sekrit" not in repr(settings)
