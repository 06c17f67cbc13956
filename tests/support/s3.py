"""moto's S3 and IAM in server mode, as a separate process on 127.0.0.1.

Authentication is on (INITIAL_NO_AUTH_ACTION_COUNT): after the first three
calls, which create an admin user, every request must be signed with keys
that exist in moto's IAM and whose policy allows the action, as on AWS.
"""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
from dataclasses import dataclass
from typing import Any

import boto3

from tests.support.net import free_port, wait_for_port

ALLOW_ALL = json.dumps(
    {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}
)


@dataclass(frozen=True)
class Keys:
    access_key_id: str
    secret_access_key: str


class MotoS3:
    def __init__(self, process: subprocess.Popen[bytes], endpoint: str) -> None:
        self.process = process
        self.endpoint = endpoint
        self.admin_keys = self._bootstrap_admin()
        self.bucket = self.create_bucket()
        self.app_keys = self.create_user_keys(allowed=True)

    def client(self, service: str, keys: Keys | None = None) -> Any:
        keys = keys or self.admin_keys
        return boto3.session.Session().client(
            service,
            endpoint_url=self.endpoint,
            region_name="us-east-1",
            aws_access_key_id=keys.access_key_id,
            aws_secret_access_key=keys.secret_access_key,
        )

    def _bootstrap_admin(self) -> Keys:
        iam = self.client("iam", Keys("bootstrap", "bootstrap"))
        iam.create_user(UserName="admin")
        key = iam.create_access_key(UserName="admin")["AccessKey"]
        iam.put_user_policy(UserName="admin", PolicyName="all", PolicyDocument=ALLOW_ALL)
        return Keys(key["AccessKeyId"], key["SecretAccessKey"])

    def create_bucket(self, name: str | None = None) -> str:
        name = name or f"bucket-{secrets.token_hex(6)}"
        self.client("s3").create_bucket(Bucket=name)
        return name

    def create_user_keys(self, *, allowed: bool) -> Keys:
        """Keys of a new IAM user; without ``allowed`` the user has no policy (403)."""
        user = f"app-{secrets.token_hex(6)}"
        iam = self.client("iam")
        iam.create_user(UserName=user)
        key = iam.create_access_key(UserName=user)["AccessKey"]
        keys = Keys(key["AccessKeyId"], key["SecretAccessKey"])
        self._users[keys.access_key_id] = user
        if allowed:
            self.grant(keys)
        return keys

    def grant(self, keys: Keys) -> None:
        self.client("iam").put_user_policy(
            UserName=self._users[keys.access_key_id], PolicyName="all", PolicyDocument=ALLOW_ALL
        )

    def revoke(self, keys: Keys) -> None:
        """Take the user's permissions away, as an administrator revoking access would."""
        self.client("iam").delete_user_policy(
            UserName=self._users[keys.access_key_id], PolicyName="all"
        )

    @property
    def _users(self) -> dict[str, str]:
        if not hasattr(self, "_user_names"):
            self._user_names: dict[str, str] = {}
        return self._user_names

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()


def start_moto() -> MotoS3:
    port = free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; from moto.server import main; sys.exit(main(sys.argv[1:]))",
            "-H",
            "127.0.0.1",
            "-p",
            str(port),
        ],
        env={
            **_clean_env(),
            "INITIAL_NO_AUTH_ACTION_COUNT": "3",
        },
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_for_port("127.0.0.1", port, timeout=60, process=process)
    return MotoS3(process, f"http://127.0.0.1:{port}")


def _clean_env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
