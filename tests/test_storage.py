"""spec.storage -> the S3 environment: references resolved, the spec's endpoint only."""

from __future__ import annotations

from pathlib import Path

import pytest

from fljob.errors import UsageError
from fljob.spec.models import Storage
from fljob.storage import apply_storage_environment, join, split_s3, storage_environment


def test_references_resolve_file_over_env_and_fall_back_to_the_target(tmp_path: Path) -> None:
    secret_file = tmp_path / "secret"
    secret_file.write_text("from-file\n")
    storage = Storage.model_validate({
        "endpoint_url": "http://127.0.0.1:18590", "region": "eu-west-1",
        "access_key_id": {"env": "MY_KEY"},
        "secret_access_key": {"env": "MY_SECRET", "file": str(secret_file)},
        "session_token": {"k8s_secret": {"name": "s3", "key": "token"}},
    })
    env = storage_environment(storage, {"MY_KEY": "key-id", "MY_SECRET": "from-env",
                                        "AWS_SESSION_TOKEN": "injected"})
    assert env["AWS_ACCESS_KEY_ID"] == "key-id"
    assert env["AWS_SECRET_ACCESS_KEY"] == "from-file"  # the file wins
    assert env["AWS_SESSION_TOKEN"] == "injected"  # Kubernetes put it into the target
    assert env["S3_ENDPOINT_URL"] == env["AWS_ENDPOINT_URL"] == "http://127.0.0.1:18590"
    assert env["AWS_DEFAULT_REGION"] == "eu-west-1"


def test_an_unset_endpoint_removes_a_stray_one() -> None:
    environ = {"S3_ENDPOINT_URL": "http://elsewhere", "AWS_ENDPOINT_URL": "http://elsewhere"}
    apply_storage_environment(Storage(), environ)
    assert "S3_ENDPOINT_URL" not in environ and "AWS_ENDPOINT_URL" not in environ


def test_an_unreadable_secret_file_names_the_variable_not_a_value(tmp_path: Path) -> None:
    storage = Storage.model_validate({
        "access_key_id": {"env": "K"}, "secret_access_key": {"file": str(tmp_path / "nope")}})
    with pytest.raises(UsageError, match="AWS_SECRET_ACCESS_KEY"):
        storage_environment(storage, {"K": "v"})


def test_uris() -> None:
    assert split_s3("s3://bucket/a/b/") == ("bucket", "a/b")
    assert join("s3://bucket/a/", "index.json") == "s3://bucket/a/index.json"
    assert join("/data/x", "index.json") == "/data/x/index.json"
    with pytest.raises(UsageError):
        split_s3("s3:/bucket")
