"""The S3 credential check, against moto's S3 server with authentication on."""

from __future__ import annotations

import asyncio

import pytest
from aiohttp.test_utils import TestClient

from service import migrate
from service.app import create_app
from service.config import Settings
from service.storage import S3CredentialChecker, S3State
from tests.support.s3 import MotoS3
from tests.support.service import OPERATOR


async def test_valid_keys_and_bucket_are_ok(aws_env: MotoS3) -> None:
    checker = S3CredentialChecker(aws_env.bucket)
    verdict = await checker.check_now()
    assert verdict.state is S3State.OK
    assert verdict.checked_at is not None


async def test_unknown_keys_are_forbidden(aws_env: MotoS3, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAUNKNOWNKEY000000")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret")
    verdict = await S3CredentialChecker(aws_env.bucket).check_now()
    assert verdict.state is S3State.FORBIDDEN
    assert "wrong-secret" not in verdict.detail and "AKIAUNKNOWN" not in verdict.detail


async def test_wrong_secret_is_forbidden(aws_env: MotoS3, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    verdict = await S3CredentialChecker(aws_env.bucket).check_now()
    assert verdict.state is S3State.FORBIDDEN


async def test_missing_bucket(aws_env: MotoS3) -> None:
    verdict = await S3CredentialChecker("no-such-bucket-here").check_now()
    assert verdict.state is S3State.BUCKET_MISSING
    assert verdict.detail == "bucket 'no-such-bucket-here' does not exist"


async def test_no_credentials(aws_env: MotoS3, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    verdict = await S3CredentialChecker(aws_env.bucket).check_now()
    assert verdict.state is S3State.NO_CREDENTIALS


async def test_unreachable_endpoint(aws_env: MotoS3, monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.support.net import free_port

    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{free_port()}")
    verdict = await S3CredentialChecker(aws_env.bucket).check_now()
    assert verdict.state is S3State.UNREACHABLE


async def test_unconfigured_bucket_is_reported_without_a_check() -> None:
    checker = S3CredentialChecker(None)
    verdict = await checker.check_now()
    assert verdict.state is S3State.NOT_CONFIGURED
    assert checker.checks == 0


async def test_periodic_check_recovers_when_keys_become_valid(
    aws_env: MotoS3, monkeypatch: pytest.MonkeyPatch
) -> None:
    keys = aws_env.create_user_keys(allowed=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", keys.access_key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", keys.secret_access_key)
    checker = S3CredentialChecker(aws_env.bucket, interval_seconds=0.05)
    assert (await checker.check_now()).state is S3State.FORBIDDEN

    runner = asyncio.create_task(checker.run())
    try:
        aws_env.grant(keys)
        async with asyncio.timeout(10):
            while not checker.verdict.ok:
                await checker.wait_for_check(checker.checks)
    finally:
        runner.cancel()
    assert checker.verdict.state is S3State.OK


async def test_readyz_reports_the_verdict(aiohttp_client, settings: Settings, engine) -> None:
    client: TestClient = await aiohttp_client(create_app(settings))
    response = await client.get("/readyz", headers=OPERATOR)
    assert response.status == 200
    body = await response.json()
    assert body["status"] == "ok"
    assert body["checks"]["database"] == {"state": "ok", "revision": migrate.head_revision()}
    assert body["checks"]["s3"]["state"] == "ok"


async def test_readyz_is_503_when_the_bucket_is_missing(
    aiohttp_client, settings: Settings, engine
) -> None:
    client: TestClient = await aiohttp_client(
        create_app(settings.replace(s3_bucket="missing-bucket-x"))
    )
    response = await client.get("/readyz", headers=OPERATOR)
    assert response.status == 503
    body = await response.json()
    assert body["status"] == "unavailable"
    assert body["checks"]["s3"]["state"] == "bucket_missing"


async def test_the_check_runs_once_at_start_not_per_request(
    aiohttp_client, settings: Settings, engine
) -> None:
    app = create_app(settings.replace(s3_check_interval_seconds=3600))
    client: TestClient = await aiohttp_client(app)
    from service.keys import S3_CHECKER

    for _ in range(3):
        await client.get("/readyz")
    assert app[S3_CHECKER].checks == 1
