"""The Swift S3 server of tests/infra/s3.sh behaves like S3 where fljob relies on it."""

from __future__ import annotations

import io
import uuid

import pytest


def test_roundtrip_auth_and_multipart(s3_server):
    """Objects round-trip, a wrong secret is refused (signatures are checked), multipart works."""
    import boto3
    from boto3.s3.transfer import TransferConfig
    from botocore.exceptions import ClientError

    client = s3_server.client()
    key = f"probe/{uuid.uuid4().hex}"
    client.put_object(Bucket=s3_server.bucket, Key=key, Body=b"fljob")
    assert client.get_object(Bucket=s3_server.bucket, Key=key)["Body"].read() == b"fljob"

    wrong = boto3.client("s3", endpoint_url=s3_server.endpoint_url, region_name=s3_server.region,
                         aws_access_key_id=s3_server.access_key_id, aws_secret_access_key="not-the-secret")
    with pytest.raises(ClientError, match="SignatureDoesNotMatch"):
        wrong.get_object(Bucket=s3_server.bucket, Key=key)

    payload = bytes(range(256)) * (12 * 1024 * 1024 // 256)  # 12 MiB: three 5 MiB parts
    config = TransferConfig(multipart_threshold=5 * 1024 * 1024, multipart_chunksize=5 * 1024 * 1024)
    client.upload_fileobj(io.BytesIO(payload), s3_server.bucket, key + ".big", Config=config)
    head = client.head_object(Bucket=s3_server.bucket, Key=key + ".big")
    assert head["ContentLength"] == len(payload)
    assert head["ETag"].strip('"').endswith("-3")  # a multipart ETag: 3 parts
    out = io.BytesIO()
    client.download_fileobj(s3_server.bucket, key + ".big", out)
    assert out.getvalue() == payload
