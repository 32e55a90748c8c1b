"""S3 fixtures: a moto S3 server on 127.0.0.1 started by the tests themselves (no network needed).

`s3_server` runs once per session and creates one bucket; `s3_location` gives each test its own
prefix in that bucket, as the `root` + `storage_options` a DatasetStore or a flow takes.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

S3_BUCKET = "avr-test-bucket"


@dataclass(frozen=True)
class S3Location:
    """Where a test may write on the moto server, and how to reach it through s3fs."""

    endpoint_url: str
    bucket: str
    root: str
    storage_options: dict[str, Any] = field(default_factory=dict)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _storage_options(endpoint_url: str) -> dict[str, Any]:
    # The region comes from AWS_DEFAULT_REGION: a region_name in client_kwargs makes moto reject
    # bucket creation ("location-constraint is not valid"), see FACTS.md.
    return {"endpoint_url": endpoint_url, "key": "testing", "secret": "testing"}


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Location]:
    """A moto S3 server with one empty bucket; root is the bucket itself."""
    from moto.server import ThreadedMotoServer

    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    # A proxy from the environment must not intercept requests to the local server.
    os.environ["NO_PROXY"] = ",".join(filter(None, [os.environ.get("NO_PROXY"), "127.0.0.1"]))
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint_url = f"http://127.0.0.1:{port}"
    options = _storage_options(endpoint_url)
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True, **options)
    fs.mkdir(S3_BUCKET)
    try:
        yield S3Location(endpoint_url, S3_BUCKET, f"s3://{S3_BUCKET}", options)
    finally:
        server.stop()


@pytest.fixture
def s3_location(s3_server: S3Location) -> S3Location:
    """A fresh prefix in the session bucket: s3://bucket/<unique>, with its storage_options."""
    prefix = f"test-{uuid.uuid4().hex[:12]}"
    return S3Location(
        endpoint_url=s3_server.endpoint_url,
        bucket=s3_server.bucket,
        root=f"s3://{s3_server.bucket}/{prefix}",
        storage_options=dict(s3_server.storage_options),
    )
