"""The app's S3 credentials: checked off the request path, the verdict cached.

A boto3 client built from the standard AWS configuration (environment, shared
files, instance roles; ``AWS_ENDPOINT_URL_S3`` for a non-AWS endpoint) calls
``head_bucket`` at start and every interval, in a thread. Handlers only read
``verdict``. After a failure the next check builds a fresh client, so rotated
credentials are picked up without a restart.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import boto3
import botocore.loaders
import botocore.session
from botocore.config import Config as BotoConfig
from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

log = logging.getLogger(__name__)

ClientFactory = Callable[[], Any]


class S3State(enum.StrEnum):
    OK = "ok"
    NOT_CONFIGURED = "not_configured"
    UNCHECKED = "unchecked"
    NO_CREDENTIALS = "no_credentials"
    FORBIDDEN = "forbidden"
    BUCKET_MISSING = "bucket_missing"
    UNREACHABLE = "unreachable"
    ERROR = "error"


@dataclass(frozen=True, slots=True)
class S3Verdict:
    state: S3State
    detail: str
    checked_at: datetime | None = None

    @property
    def ok(self) -> bool:
        return self.state is S3State.OK

    def as_json(self) -> dict[str, Any]:
        return {
            "state": self.state.value,
            "detail": self.detail,
            "checked_at": self.checked_at.isoformat() if self.checked_at else None,
        }


# botocore's service models (JSON files) are read once per process, not once per
# client: a new client (after a failed check: the credentials may have rotated)
# costs milliseconds instead of ~0.1 s of parsing.
_MODELS = botocore.loaders.create_loader()


def default_client_factory() -> Any:
    config = BotoConfig(
        connect_timeout=5, read_timeout=5, retries={"max_attempts": 2, "mode": "standard"}
    )
    session = botocore.session.Session()  # credentials: the standard chain, read afresh
    session.register_component("data_loader", _MODELS)
    client = boto3.session.Session(botocore_session=session).client("s3", config=config)
    # boto3 adds its own data folder to the loader's search path per session:
    # once is enough for a loader that outlives them.
    paths = _MODELS.search_paths
    paths[:] = list(dict.fromkeys(paths))
    return client


class S3CredentialChecker:
    def __init__(
        self,
        bucket: str | None,
        *,
        interval_seconds: float = 60.0,
        client_factory: ClientFactory = default_client_factory,
    ) -> None:
        self.bucket = bucket
        self.interval_seconds = interval_seconds
        self._client_factory = client_factory
        self._client: Any = None
        self._changed = asyncio.Condition()
        self._verdict = (
            S3Verdict(S3State.UNCHECKED, "not checked yet")
            if bucket
            else S3Verdict(S3State.NOT_CONFIGURED, "S3_BUCKET is not set")
        )
        self.checks = 0

    @property
    def verdict(self) -> S3Verdict:
        return self._verdict

    async def check_now(self) -> S3Verdict:
        if not self.bucket:
            return self._verdict
        verdict = await asyncio.to_thread(self._check)
        async with self._changed:
            if verdict.state != self._verdict.state:
                log_fn = log.info if verdict.ok else log.error
                log_fn("S3 credential check on bucket %r: %s", self.bucket, verdict.detail)
            self._verdict = verdict
            self.checks += 1
            self._changed.notify_all()
        return verdict

    async def wait_for_check(self, after: int) -> S3Verdict:
        """Wait until more than ``after`` checks have completed (for tests and readiness)."""
        async with self._changed:
            await self._changed.wait_for(lambda: self.checks > after)
            return self._verdict

    async def run(self) -> None:
        """Check every interval until cancelled."""
        while True:
            await asyncio.sleep(self.interval_seconds)
            await self.check_now()

    def _check(self) -> S3Verdict:
        now = datetime.now(UTC)
        try:
            if self._client is None:
                self._client = self._client_factory()
            self._client.head_bucket(Bucket=self.bucket)
        except NoCredentialsError:
            verdict = S3Verdict(S3State.NO_CREDENTIALS, "no AWS credentials were found", now)
        except ClientError as exc:
            verdict = _client_error_verdict(exc, self.bucket or "", now)
        except BotoCoreError as exc:
            # Connection and endpoint errors; their text names the endpoint, not keys.
            verdict = S3Verdict(S3State.UNREACHABLE, f"S3 is unreachable: {exc}", now)
        except Exception as exc:  # a bad region or endpoint URL, say
            verdict = S3Verdict(S3State.ERROR, f"S3 check failed: {type(exc).__name__}", now)
        else:
            return S3Verdict(S3State.OK, f"bucket {self.bucket!r} is reachable", now)
        self._client = None  # build a new one next time: credentials may have rotated
        return verdict


def _client_error_verdict(exc: ClientError, bucket: str, now: datetime) -> S3Verdict:
    code = str(exc.response.get("Error", {}).get("Code", ""))
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    if code in {"404", "NoSuchBucket", "NotFound"} or status == 404:
        return S3Verdict(S3State.BUCKET_MISSING, f"bucket {bucket!r} does not exist", now)
    if code in {"403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"} or (
        status == 403
    ):
        return S3Verdict(
            S3State.FORBIDDEN,
            f"access to bucket {bucket!r} was refused (HTTP 403): the credentials are wrong "
            "or lack s3:ListBucket",
            now,
        )
    return S3Verdict(S3State.ERROR, f"head_bucket on {bucket!r} answered {code or status}", now)
