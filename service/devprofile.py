"""The local dev profile (`inngest-outbox serve --dev`).

It makes a newcomer's first POST succeed: a session secret kept in
``.inngest-outbox/`` and, when no S3 is configured, moto's S3 on loopback with
the bucket created. It creates nothing else, and says what it chose.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from .config import Profile, Settings, decode_session_secret, encode_session_secret

log = logging.getLogger(__name__)

STATE_DIR = Path(".inngest-outbox")
DEV_BUCKET = "inngest-outbox-dev"
# What Inngest's SDKs send when no key is configured; the dev server accepts it.
DEV_EVENT_KEY = "NO_EVENT_KEY_SET"


def load_or_create_secret(state_dir: Path = STATE_DIR) -> bytes:
    path = state_dir / "session-secret"
    if path.exists():
        return decode_session_secret(path.read_text())
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    key = os.urandom(32)
    # Written whole under a temporary name, then linked into place: a second
    # dev process started at the same moment reads a complete key, never half
    # of one, and never overwrites the first's.
    temporary = state_dir / f".session-secret.{os.getpid()}"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(encode_session_secret(key) + "\n")
    try:
        os.link(temporary, path)
    except FileExistsError:
        return decode_session_secret(path.read_text())
    finally:
        temporary.unlink()
    log.info("dev profile: generated a session secret in %s", path)
    return key


def start_local_s3(bucket: str = DEV_BUCKET) -> Any:
    """moto's S3 on 127.0.0.1, with ``bucket`` created; points boto3 at it."""
    try:
        import boto3
        from moto.server import ThreadedMotoServer
    except ImportError as exc:  # pragma: no cover - the dev extra is missing
        raise SystemExit(
            "the dev profile's local S3 needs moto: pip install -e '.[dev]' "
            "(or set S3_BUCKET and the AWS variables for a real bucket)"
        ) from exc
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    # Our own process only: boto3 reads these, as it reads them in production.
    os.environ["AWS_ENDPOINT_URL_S3"] = endpoint
    os.environ["AWS_ACCESS_KEY_ID"] = "dev-local-s3"
    os.environ["AWS_SECRET_ACCESS_KEY"] = "dev-local-s3"  # noqa: S105 - moto accepts any
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    boto3.session.Session().client("s3").create_bucket(Bucket=bucket)
    log.info("dev profile: no S3 configured; serving a local S3 stand-in at %s", endpoint)
    log.info("dev profile: created bucket %r in the local S3 stand-in", bucket)
    return server


def dev_settings(settings: Settings) -> Settings:
    """Fill in what the dev profile provides; report what it chose."""
    changes: dict[str, Any] = {"profile": Profile.DEV}
    if settings.session_secret is None:
        changes["session_secret"] = load_or_create_secret()
        log.info("dev profile: using the session secret in %s", STATE_DIR / "session-secret")
    if not settings.s3_bucket:
        start_local_s3()
        changes["s3_bucket"] = DEV_BUCKET
    else:
        log.info("dev profile: checking the configured S3 bucket %r", settings.s3_bucket)
    log.info("dev profile: database %s", _safe_url(settings.database_url))
    return dev_worker_settings(settings.replace(**changes))


def dev_worker_settings(settings: Settings) -> Settings:
    """The dev profile's delivery defaults: Inngest's dev server takes any key."""
    if settings.inngest_event_key:
        return settings.replace(profile=Profile.DEV)
    log.info(
        "dev profile: INNGEST_EVENT_KEY is unset; sending to %s with the placeholder key %s",
        settings.inngest_base_url,
        DEV_EVENT_KEY,
    )
    return settings.replace(profile=Profile.DEV, inngest_event_key=DEV_EVENT_KEY)


def _safe_url(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)
