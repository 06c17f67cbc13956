"""The `inngest-outbox` command as a user runs it: exit codes and messages.
Real processes, but for users add's table of bad input (main() in-process:
see support.service.call_cli)."""

from __future__ import annotations

import base64
import os
import stat
import sys
from pathlib import Path

import pytest

from service import cli, migrate
from tests.support.s3 import MotoS3
from tests.support.service import ServiceProcess, base_env, call_cli, run_cli

SECRET = base64.urlsafe_b64encode(os.urandom(32)).decode()


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    return base_env(DATABASE_URL=f"sqlite+aiosqlite:///{tmp_path / 'cli.db'}")


def test_help_lists_the_commands(tmp_path: Path, env: dict[str, str]) -> None:
    result = run_cli("--help", env=env, cwd=tmp_path)
    assert result.returncode == 0
    for command in ("serve", "migrate", "users"):
        assert command in result.stdout


def test_unknown_command_is_usage_error(tmp_path: Path, env: dict[str, str]) -> None:
    result = run_cli("frobnicate", env=env, cwd=tmp_path)
    assert result.returncode == 2
    assert "invalid choice: 'frobnicate'" in result.stderr


def test_migrate_then_add_users_from_stdin(tmp_path: Path, env: dict[str, str]) -> None:
    migrated = run_cli("migrate", env=env, cwd=tmp_path)
    assert migrated.returncode == 0, migrated.stderr
    assert migrated.stdout == "database migrated to head\n"

    added = run_cli("users", "add", "alice", env=env, cwd=tmp_path, input="a long password\n")
    assert added.returncode == 0, added.stderr
    assert added.stdout == "created user 'alice' (id 1)\n"
    admin = run_cli("users", "add", "root", "--admin", env=env, cwd=tmp_path, input="pw-pw-pw-pw\n")
    assert admin.stdout == "created user 'root' (id 2, admin)\n"

    again = run_cli("users", "add", "alice", env=env, cwd=tmp_path, input="a long password\n")
    assert again.returncode == 1
    assert again.stderr == "inngest-outbox: user 'alice' already exists\n"
    for secret in ("a long password", "pw-pw-pw-pw"):
        assert secret not in added.stdout + added.stderr + admin.stdout + admin.stderr


@pytest.mark.parametrize(
    ("name", "password", "message"),
    [
        ("bad name", "long enough", "a username is 1 to 64 characters"),
        ("bob", "short", "a password is 8 to 1024 characters long"),
        ("bob", "", "a password is 8 to 1024 characters long"),
    ],
)
def test_users_add_refuses_bad_input(
    tmp_path: Path, env: dict[str, str], name: str, password: str, message: str
) -> None:
    call_cli("migrate", env=env, cwd=tmp_path)
    result = call_cli("users", "add", name, env=env, cwd=tmp_path, input=password + "\n")
    assert result.returncode == 2
    assert result.stderr.startswith(f"inngest-outbox: {message}")


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"S3_BUCKET": "b"}, "SESSION_SECRET is not set."),
        ({"S3_BUCKET": "b", "SESSION_SECRET": "c2hvcnQ="}, "SESSION_SECRET must decode to 32"),
        ({"SESSION_SECRET": SECRET}, "S3_BUCKET is not set"),
        ({"SESSION_SECRET": SECRET, "S3_BUCKET": "b", "PORT": "x"}, "PORT must be a whole"),
        ({"LOG_LEVEL": "verbose"}, "LOG_LEVEL must be one of DEBUG, INFO"),
        ({"DATABASE_URL": "nonsense"}, "DATABASE_URL is not an SQLAlchemy URL"),
        ({"DATABASE_URL": "sqlite:///x.db"}, "DATABASE_URL must start with one of"),
        ({"DATABASE_URL": "postgresql://u@h/db"}, "DATABASE_URL must start with one of"),
        ({"SESSION_SECRET": SECRET, "S3_BUCKET": "b"}, "INNGEST_EVENT_KEY is not set"),
    ],
)
def test_production_refuses_to_start_without_what_it_needs(
    tmp_path: Path, env: dict[str, str], extra: dict[str, str], message: str
) -> None:
    result = run_cli("serve", env={**env, **extra}, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith(f"inngest-outbox: configuration error: {message}")
    assert SECRET not in result.stderr


def test_production_refuses_a_missing_database_file_and_creates_none(
    tmp_path: Path, env: dict[str, str]
) -> None:
    production = {**env, "SESSION_SECRET": SECRET, "S3_BUCKET": "b", "INNGEST_EVENT_KEY": "k"}
    result = run_cli("serve", env=production, cwd=tmp_path)
    assert result.returncode == 2
    assert f"the database file {tmp_path / 'cli.db'} does not exist" in result.stderr
    assert not (tmp_path / "cli.db").exists()


def test_production_refuses_an_unmigrated_database(tmp_path: Path, env: dict[str, str]) -> None:
    import sqlite3

    sqlite3.connect(tmp_path / "cli.db").close()
    production = {**env, "SESSION_SECRET": SECRET, "S3_BUCKET": "b", "INNGEST_EVENT_KEY": "k"}
    result = run_cli("serve", env=production, cwd=tmp_path)
    assert result.returncode == 2
    head = migrate.head_revision()
    assert f"schema is at revision none, not {head}: run `inngest-outbox migrate` first" in (
        result.stderr
    )


def test_users_add_on_an_unmigrated_database_says_so(tmp_path: Path, env: dict[str, str]) -> None:
    result = run_cli("users", "add", "alice", env=env, cwd=tmp_path, input="a long password\n")
    assert result.returncode == 1
    assert result.stderr == (
        "inngest-outbox: database error: no such table: users "
        "(has `inngest-outbox migrate` been run?)\n"
    )


def test_users_add_prompts_twice_on_a_terminal(tmp_path: Path, env: dict[str, str]) -> None:
    import pty
    import subprocess
    import sys

    run_cli("migrate", env=env, cwd=tmp_path)
    leader, follower = pty.openpty()
    process = subprocess.Popen(
        [sys.executable, "-m", "service", "users", "add", "carol"],
        stdin=follower,
        stdout=follower,
        stderr=follower,
        env=env,
        cwd=tmp_path,
    )
    os.close(follower)
    seen = b""
    for answer in (b"a long password\n", b"a long password\n"):
        while b"assword: " not in seen[-40:]:
            seen += os.read(leader, 1024)
        seen = b""
        os.write(leader, answer)
    assert process.wait(timeout=30) == 0
    output = b""
    try:
        while chunk := os.read(leader, 1024):
            output += chunk
    except OSError:
        pass
    os.close(leader)
    assert b"created user 'carol'" in output
    assert b"a long password" not in output  # getpass does not echo


def test_production_serves_on_host_and_port_from_the_environment(
    tmp_path: Path, env: dict[str, str], moto_s3: MotoS3
) -> None:
    run_cli("migrate", env=env, cwd=tmp_path)
    service_env = {
        **env,
        "SESSION_SECRET": SECRET,
        "S3_BUCKET": moto_s3.bucket,
        "AWS_ENDPOINT_URL_S3": moto_s3.endpoint,
        "AWS_ACCESS_KEY_ID": moto_s3.app_keys.access_key_id,
        "AWS_SECRET_ACCESS_KEY": moto_s3.app_keys.secret_access_key,
        "AWS_DEFAULT_REGION": "us-east-1",
        "INNGEST_EVENT_KEY": "k",
    }
    service = ServiceProcess(["serve"], env=service_env, cwd=tmp_path).wait_ready()
    assert service.stop() == 0
    output = service.log()
    assert f"serving on http://127.0.0.1:{service.port} (profile production, worker on)" in output
    for secret in (SECRET, moto_s3.app_keys.secret_access_key):
        assert secret not in output


def test_dev_profile_keeps_its_secret_private(tmp_path: Path, env: dict[str, str]) -> None:
    service = ServiceProcess(["serve", "--dev"], env=env, cwd=tmp_path).wait_ready()
    service.stop()
    secret_file = tmp_path / ".inngest-outbox" / "session-secret"
    assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(secret_file.parent.stat().st_mode) == 0o700
    assert len(base64.urlsafe_b64decode(secret_file.read_text().strip())) == 32
    assert secret_file.read_text().strip() not in service.log()


def test_serving_processes_shorten_the_switch_interval() -> None:
    """serve and worker call it once started (see service.cli)."""
    before = sys.getswitchinterval()
    try:
        cli.shorten_switch_interval()
        assert sys.getswitchinterval() == pytest.approx(0.0005)
        assert sys.getswitchinterval() < before
    finally:
        sys.setswitchinterval(before)
