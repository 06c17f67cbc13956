"""The operators' commands as a person and a script run them: their arguments,
exit statuses, stdout and stderr (main() in this process; see support.service.call_cli)."""

from __future__ import annotations

import asyncio
import getpass
import json
import socket
from pathlib import Path

import aiohttp
import pytest

from service import migrate
from service.config import Settings
from service.store.database import Database
from tests.fakes.inngest import POISON_ERROR, StandIn
from tests.support.service import ServiceProcess, base_env, call_cli, poll_until
from tests.test_delivery import enqueue, make_worker, states
from tests.test_operations import fail_for_good
from tests.test_worker_process import env as process_env  # noqa: F401 (fixture)
from tests.test_worker_process import post_documents, rows


@pytest.fixture
def cli_env(db: Database) -> dict[str, str]:
    return base_env(DATABASE_URL=db.url, LOG_LEVEL="WARNING")


def cli(*args: str, env: dict[str, str], cwd: Path) -> tuple[int, str, str]:
    result = call_cli(*args, env=env, cwd=cwd)
    return result.returncode, result.stdout, result.stderr


async def acli(*args: str, env: dict[str, str], cwd: Path) -> tuple[int, str, str]:
    return await asyncio.to_thread(cli, *args, env=env, cwd=cwd)


async def test_status_list_show_replay_and_purge(
    db: Database,
    cli_env: dict[str, str],
    tmp_path: Path,
    delivery_settings: Settings,
    http,
    inngest: StandIn,
) -> None:
    failed = await fail_for_good(db, delivery_settings, http, inngest, 2)
    delivered = await enqueue(db, 3)
    await make_worker(db, delivery_settings, http).drain_once()
    [pending] = await enqueue(db, 1)
    env, cwd = cli_env, tmp_path

    code, out, _ = await acli("status", "--json", env=env, cwd=cwd)
    assert code == 0
    status = json.loads(out)
    assert status["counts"] == {"pending": 1, "sending": 0, "delivered": 3, "failed": 2}
    assert status["backlog"] == 1 and status["failures_last_hour"] == 2
    code, out, _ = await acli("status", env=env, cwd=cwd)
    assert code == 0
    assert "failed                       2\n" in out
    assert "failures in the last hour    2\n" in out

    code, out, _ = await acli("list", "--status", "failed", "--json", env=env, cwd=cwd)
    listed = json.loads(out)
    assert sorted(e["id"] for e in listed["events"]) == sorted(failed)
    assert listed["nextCursor"] is None
    assert all(e["lastStatusCode"] == 400 for e in listed["events"])
    code, out, _ = await acli("list", "--limit", "4", env=env, cwd=cwd)
    newest_first = sorted(failed + delivered + [pending], reverse=True)
    lines = out.splitlines()
    header = ["ID", "NAME", "ORIGIN", "STATUS", "ATTEMPTS", "CREATED", "LAST", "ERROR"]
    assert lines[0].split() == header
    assert [line.split()[0] for line in lines[1:5]] == newest_first[:4]
    assert [line.split()[2] for line in lines[1:5]] == ["api"] * 4  # posted to /api
    assert lines[-1] == f"more: add --cursor {newest_first[3]}"
    code, out, _ = await acli(
        "list", "--limit", "4", "--cursor", newest_first[3], "--json", env=env, cwd=cwd
    )
    assert [e["id"] for e in json.loads(out)["events"]] == newest_first[4:]

    code, out, _ = await acli("show", failed[0], env=env, cwd=cwd)
    assert code == 0
    assert f"id                {failed[0]}\n" in out
    assert "status            failed\n" in out
    assert "origin            api\n" in out
    assert f'"id": "{failed[0]}"' in out  # the event as sent
    assert "history:\nAT" in out and POISON_ERROR in out
    code, out, _ = await acli("show", failed[0], "--json", env=env, cwd=cwd)
    shown = json.loads(out)
    assert [h["kind"] for h in shown["history"]] == ["failed"]
    assert shown["event"]["id"] == failed[0]
    assert shown["origin"] is None
    code, out, err = await acli("show", "no-such-id", env=env, cwd=cwd)
    assert (code, out, err) == (1, "", "inngest-outbox: no event 'no-such-id' in the outbox\n")

    code, out, _ = await acli(
        "replay", "--status", "failed", "--dry-run", "--json", env=env, cwd=cwd
    )
    assert sorted(json.loads(out)["wouldReplay"]) == sorted(failed)
    assert {row.status for i, row in (await states(db.engine)).items() if i in failed} == {"failed"}
    code, out, err = await acli("replay", failed[0], pending, "--by", "ops", env=env, cwd=cwd)
    assert code == 0
    assert out == (
        "replayed 1 of 2 matched events\n"
        f"  {failed[0]} (was failed)\n"
        f"  skipped {pending}: pending: already on its way\n"
    )
    assert err == "examined 2 rows…\n"  # progress, a line per batch
    code, out, _ = await acli(
        "replay", "--status", "failed", "--new-id", "--json", env=env, cwd=cwd
    )
    [moved] = json.loads(out)["replayed"]
    assert moved["id"] == failed[1] and moved["newId"] not in (None, failed[1])
    code, out, _ = await acli("show", failed[1], "--json", env=env, cwd=cwd)
    assert json.loads(out)["id"] == moved["newId"]  # the old id still finds it
    # Who replayed it: --by, or the user and host of the shell.
    assert json.loads(out)["history"][-1]["actor"] == f"{getpass.getuser()}@{socket.gethostname()}"

    code, out, _ = await acli("purge", "--delivered-older-than", "7d", env=env, cwd=cwd)
    assert (code, out) == (0, "deleted 0 delivered and 0 failed rows\n")
    code, out, _ = await acli(
        "purge", "--delivered-older-than", "0s", "--dry-run", env=env, cwd=cwd
    )
    assert out == "would delete 3 delivered and 0 failed rows\n"
    code, out, _ = await acli("purge", "--delivered-older-than", "0s", "--json", env=env, cwd=cwd)
    assert json.loads(out) == {"delivered": 3, "failed": 0, "dry_run": False}
    assert set(await states(db.engine)) == {failed[0], moved["newId"], pending}


@pytest.fixture(scope="module")
def migrated(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, str], Path]:
    cwd = tmp_path_factory.mktemp("cli")
    env = base_env(DATABASE_URL=f"sqlite+aiosqlite:///{cwd / 'x.db'}")
    assert cli("migrate", env=env, cwd=cwd)[0] == 0
    return env, cwd


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["list", "--status", "sent"],
            "'sent' is not a status: use one of pending, sending, delivered, failed",
        ),
        (["list", "--limit", "0"], "limit must be between 1 and 500"),
        (
            ["list", "--since", "yesterday"],
            "'yesterday' is not a time: use ISO 8601 (2026-11-23T10:00:00Z) or an age (2h, 7d)",
        ),
        (["replay"], "give event ids, or --status failed|delivered to replay by filter"),
        (
            ["replay", "x", "--status", "failed"],
            "give event ids or a filter (--status …), not both",
        ),
        (["replay", "--status", "pending"], "replay --status takes failed or delivered"),
        (["purge"], "purge needs --delivered-older-than or --failed-older-than"),
        (
            ["purge", "--delivered-older-than", "7 days"],
            "'7 days' is not a duration: use a number and a unit, like 90s, 15m, 12h, 7d or 2w",
        ),
    ],
)
def test_a_bad_argument_is_a_clear_message_and_status_2(
    args: list[str], message: str, migrated: tuple[dict[str, str], Path]
) -> None:
    env, cwd = migrated
    code, out, err = cli(*args, env=env, cwd=cwd)
    assert (code, out, err) == (2, "", f"inngest-outbox: {message}\n")


def test_argparse_errors_are_status_2_too(tmp_path: Path) -> None:
    env = base_env(DATABASE_URL=f"sqlite+aiosqlite:///{tmp_path / 'x.db'}")
    code, _, err = cli("list", "--limit", "many", env=env, cwd=tmp_path)
    assert code == 2
    assert "argument --limit: invalid int value: 'many'" in err


async def has_only(env: dict[str, str], status: str) -> bool:
    return set((await rows(env)).values()) == {status}


@pytest.mark.slow
async def test_replay_of_a_filtered_set_while_the_worker_runs(
    tmp_path: Path,
    process_env: dict[str, str],  # noqa: F811
    inngest: StandIn,
) -> None:
    inngest.poison_ids = set()
    rejecting = True

    def refuse_all(events: list[dict]) -> None:  # type: ignore[type-arg]
        if rejecting:
            inngest.poison_ids.update(e["id"] for e in events)

    inngest.on_request = refuse_all
    service = await ServiceProcess(["serve"], env=process_env, cwd=tmp_path).started()
    try:
        ids = await post_documents(service.url, 6)
        await poll_until(lambda: has_only(process_env, "failed"))
        rejecting = False
        inngest.poison_ids.clear()
        code, out, err = await acli(
            "replay",
            "--status",
            "failed",
            "--name",
            "app/document.requested",
            "--json",
            env=process_env,
            cwd=tmp_path,
        )
        assert code == 0, err
        assert sorted(r["id"] for r in json.loads(out)["replayed"]) == sorted(ids)
        async with asyncio.timeout(30):
            await inngest.wait_until(lambda s: set(ids) <= set(s.accepted_ids))
        await poll_until(lambda: has_only(process_env, "delivered"))
    finally:
        assert service.stop() == 0, service.log()


def test_operator_commands_refuse_a_schema_behind_the_code(tmp_path: Path) -> None:
    env = base_env(DATABASE_URL=f"sqlite+aiosqlite:///{tmp_path / 'old.db'}")
    assert cli("migrate", "0003", env=env, cwd=tmp_path)[0] == 0
    code, out, err = cli("status", env=env, cwd=tmp_path)
    assert (code, out) == (2, "")
    assert err.endswith(
        f"inngest-outbox: configuration error: the database schema is at revision 0003, "
        f"not {migrate.head_revision()}: run `inngest-outbox migrate` first\n"
    )


async def test_json_logs_carry_each_request_id_access_lines_too(
    tmp_path: Path, service_env: dict[str, str]
) -> None:
    env = {**service_env, "LOG_FORMAT": "json", "LOG_LEVEL": "INFO", "ACCESS_LOG": "true"}
    service = await ServiceProcess(["serve", "--no-worker"], env=env, cwd=tmp_path).started()
    try:
        async with aiohttp.ClientSession() as http:
            response = await http.get(f"{service.url}/healthz", headers={"X-Request-Id": "t-42"})
            assert response.status == 200
    finally:
        assert service.stop() == 0
    lines = [json.loads(line) for line in service.log().splitlines()]  # every line is JSON
    [access] = [line for line in lines if line["logger"] == "aiohttp.access"]
    assert access["request_id"] == "t-42"
    assert "GET /healthz" in access["message"]
    assert {line["request_id"] for line in lines if line["logger"] != "aiohttp.access"} == {"-"}
