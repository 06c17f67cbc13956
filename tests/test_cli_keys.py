"""`inngest-outbox keys add|list|revoke` as an operator runs them (main(), in-process)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from tests.support.service import call_cli, query

pytestmark = pytest.mark.slow


async def test_keys_are_added_listed_and_revoked(
    service_env: dict[str, str], tmp_path: Path
) -> None:
    env = service_env
    added = call_cli("keys", "add", "shop", env=env, cwd=tmp_path)
    assert added.returncode == 0, added.stderr
    key = added.stdout.splitlines()[-1]
    assert len(key) == 64 and int(key, 16) >= 0  # 32 random bytes, in hex
    assert added.stdout.splitlines()[0].startswith("created relay key 'shop'.")
    # Only the key's hash is stored.
    assert await query(env, "SELECT name, key_hash FROM relay_keys") == [
        ("shop", hashlib.sha256(key.encode()).hexdigest())
    ]
    again = call_cli("keys", "add", "shop", env=env, cwd=tmp_path)
    assert (again.returncode, again.stdout) == (1, "")
    assert again.stderr == "inngest-outbox: a key named 'shop' exists already\n"
    other = call_cli("keys", "add", "billing", env=env, cwd=tmp_path)
    assert other.stdout.splitlines()[-1] != key

    listed = call_cli("keys", "list", env=env, cwd=tmp_path)
    lines = listed.stdout.splitlines()
    assert lines[0].split() == ["NAME", "CREATED", "LAST", "USED", "REVOKED"]
    assert [line.split()[0] for line in lines[1:]] == ["billing", "shop"]
    assert all(line.split()[-2:] == ["never", "-"] for line in lines[1:])
    assert key not in listed.stdout

    revoked = call_cli("keys", "revoke", "shop", env=env, cwd=tmp_path)
    assert revoked.returncode == 0
    assert revoked.stdout.startswith("revoked relay key 'shop'; every process refuses it within")
    twice = call_cli("keys", "revoke", "shop", env=env, cwd=tmp_path)
    assert (twice.returncode, twice.stdout) == (0, "relay key 'shop' was revoked already\n")
    shop = call_cli("keys", "list", env=env, cwd=tmp_path).stdout.splitlines()[2]
    assert shop.split()[0] == "shop" and shop.split()[-1] != "-"


@pytest.mark.parametrize("name", ["", "_under", "with space", "x" * 65, "ünïcode"])
async def test_a_bad_key_name_is_refused(
    service_env: dict[str, str], tmp_path: Path, name: str
) -> None:
    added = call_cli("keys", "add", name, env=service_env, cwd=tmp_path)
    assert (added.returncode, added.stdout) == (2, "")
    assert "a key's name is 1 to 64 letters, digits" in added.stderr
    assert await query(service_env, "SELECT count(*) FROM relay_keys") == [(0,)]


async def test_revoking_an_unknown_key_fails(service_env: dict[str, str], tmp_path: Path) -> None:
    revoked = call_cli("keys", "revoke", "nobody", env=service_env, cwd=tmp_path)
    assert (revoked.returncode, revoked.stderr) == (1, "inngest-outbox: no relay key 'nobody'\n")
