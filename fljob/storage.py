"""The spec's object storage as the environment that boto3, s3fs and streaming read.

The spec holds only references to credentials (:class:`fljob.spec.models.SecretRef`). The
process that talks to S3 resolves them once, at start-up, into the standard variables
(``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``) and sets the
endpoint and region under every name its clients look for: streaming reads
``S3_ENDPOINT_URL``, boto3 >= 1.28 and s3fs read ``AWS_ENDPOINT_URL``, all read
``AWS_DEFAULT_REGION``. Nothing here logs or returns a credential value in a message.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, MutableMapping
from pathlib import Path
from urllib.parse import urlparse

from fljob.errors import UsageError
from fljob.spec.models import SecretRef, Storage


def resolve_secret(target: str, ref: SecretRef, environ: Mapping[str, str]) -> str | None:
    """The value of ``ref`` (its file wins over its variable), else what ``target`` holds.

    A reference with only ``k8s_secret`` was injected by Kubernetes straight into
    ``target``; a reference that resolves to nothing leaves ``target`` as it is.
    """
    if ref.file:
        try:
            return Path(ref.file).read_text().strip()
        except OSError as exc:
            raise UsageError(f"the file that holds {target} ({ref.file}) cannot be read "
                             f"({exc.strerror}); fix the storage reference's `file` path") from None
    if ref.env and ref.env in environ:
        return environ[ref.env]
    return environ.get(target)


ENDPOINT_VARIABLES = ("S3_ENDPOINT_URL", "AWS_ENDPOINT_URL")
"""Where streaming (the first) and boto3/s3fs (the second) look for a custom endpoint."""


def storage_environment(storage: Storage, environ: Mapping[str, str]) -> dict[str, str]:
    """The variables to set for ``storage``: endpoint, region and resolved credentials."""
    env = {"AWS_DEFAULT_REGION": storage.region, "AWS_REGION": storage.region}
    if storage.endpoint_url:
        env.update(dict.fromkeys(ENDPOINT_VARIABLES, storage.endpoint_url))
    for target, ref in storage.credential_refs().items():
        value = resolve_secret(target, ref, environ)
        if value is not None:
            env[target] = value
    return env


def apply_storage_environment(storage: Storage,
                              environ: MutableMapping[str, str] | None = None) -> None:
    """Set :func:`storage_environment` in this process (``os.environ`` by default).

    An unset ``endpoint_url`` means AWS: an endpoint left in the environment is removed, so
    the spec alone decides where data and checkpoints go.
    """
    environ = os.environ if environ is None else environ
    if not storage.endpoint_url:
        for name in ENDPOINT_VARIABLES:
            environ.pop(name, None)
    environ.update(storage_environment(storage, environ))


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def split_s3(uri: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix`` -> ("bucket", "some/prefix")."""
    parsed = urlparse(uri)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise UsageError(f"{uri!r} is not an S3 URI; write s3://bucket/prefix")
    return parsed.netloc, parsed.path.strip("/")


def s3_client(connect_timeout: float = 5.0, attempts: int = 3):
    """A boto3 S3 client from the environment (see :func:`apply_storage_environment`).

    Short timeouts and few attempts: a wrong endpoint should fail in seconds, not minutes.
    """
    import boto3
    from botocore.config import Config

    config = Config(connect_timeout=connect_timeout, read_timeout=60,
                    retries={"max_attempts": attempts, "mode": "standard"})
    return boto3.session.Session().client(
        "s3", config=config, endpoint_url=os.environ.get("S3_ENDPOINT_URL") or None)


def check_bucket(uri: str) -> None:
    """Raise a :class:`UsageError` naming the fix when ``uri``'s bucket cannot be used."""
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

    bucket, _ = split_s3(uri)
    endpoint = os.environ.get("S3_ENDPOINT_URL") or "AWS's default endpoint"
    try:
        s3_client(attempts=1).head_bucket(Bucket=bucket)
    except NoCredentialsError:
        raise UsageError(f"no S3 credentials for {uri}: set AWS_ACCESS_KEY_ID and "
                         "AWS_SECRET_ACCESS_KEY (or storage.access_key_id/secret_access_key "
                         "references in the spec)") from None
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "?")
        if code in ("404", "NoSuchBucket"):
            raise UsageError(f"bucket {bucket!r} does not exist at {endpoint}; create it "
                             "first or name an existing bucket") from None
        raise UsageError(f"{endpoint} refused access to bucket {bucket!r} ({code}); check the "
                         "credentials in AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY and the "
                         "region") from None
    except BotoCoreError as exc:
        raise UsageError(f"cannot reach the S3 endpoint {endpoint} for {uri} "
                         f"({type(exc).__name__}); start the server or fix the endpoint "
                         "(--endpoint-url, S3_ENDPOINT_URL or storage.endpoint_url)") from None


def join(uri: str, name: str) -> str:
    """``name`` inside the folder or prefix ``uri``."""
    return f"{uri.rstrip('/')}/{name}" if is_s3(uri) else str(Path(uri) / name)


def read_bytes(uri: str) -> bytes | None:
    """A small object or file, or None when there is none."""
    if not is_s3(uri):
        path = Path(uri)
        return path.read_bytes() if path.is_file() else None
    from botocore.exceptions import ClientError

    bucket, key = split_s3(uri)
    try:
        return s3_client().get_object(Bucket=bucket, Key=key)["Body"].read()
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey"):
            return None
        raise


def write_bytes(uri: str, data: bytes) -> None:
    """Write a small object or file whole: an S3 PUT, or a local write-then-rename."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        s3_client().put_object(Bucket=bucket, Key=key, Body=data)
        return
    path = Path(uri)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def delete(uri: str) -> None:
    """Remove an object or file if it exists."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        s3_client().delete_object(Bucket=bucket, Key=key)
    else:
        Path(uri).unlink(missing_ok=True)
