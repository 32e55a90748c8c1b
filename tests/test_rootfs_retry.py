"""Storage calls ride out object-store outages: a RootFS behind a TCP proxy that goes down.

The proxy (tests/faults/tcp_proxy.py) sits between s3fs and the moto server; going down kills the
open connections too, so a call that succeeds after an outage has reconnected. Most tests turn
botocore's retries off and shorten its timeouts (`_QUICK_CLIENT`) so that RootFS's retries do
most of the work and the tests take seconds; the slow one keeps the client as it ships.
"""

from __future__ import annotations

import errno
import logging
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import aiohttp
import botocore.exceptions
import pytest
from botocore.exceptions import ClientError
from fsspec.exceptions import FSTimeoutError
from s3fs.errors import translate_boto_error

from avr_core.rootfs import RootFS, StorageRetry, StorageUnreachableError, is_transient_error
from tests.faults.tcp_proxy import OutageMode, TcpProxy
from tests.fixtures_s3 import S3Location

# One attempt per request in botocore, short timeouts: RootFS does the retrying. (s3fs's own
# loop, S3FileSystem.retries = 5, is a class attribute and stays.)
_QUICK_CLIENT: dict[str, Any] = {
    "config_kwargs": {"connect_timeout": 1, "read_timeout": 1, "retries": {"max_attempts": 1}},
}
_QUICK_RETRY = StorageRetry(max_elapsed_s=60, base_s=0.2, max_delay_s=1.0)


def _client_error(code: str, status: int, operation: str = "PutObject") -> ClientError:
    return ClientError(
        {
            "Error": {"Code": code, "Message": f"{code} from the test"},
            "ResponseMetadata": {"HTTPStatusCode": status},
        },
        operation,
    )


def _caused(err: BaseException, cause: BaseException) -> BaseException:
    err.__cause__ = cause
    return err


# ---- which errors are worth waiting for -------------------------------------------------------


@pytest.mark.parametrize(
    "err",
    [
        # What s3fs raises once its own retries give up (the 503 and 500 translated to OSError).
        translate_boto_error(_client_error("SlowDown", 503)),
        translate_boto_error(_client_error("ServiceUnavailable", 503)),
        translate_boto_error(_client_error("InternalError", 500)),
        translate_boto_error(_client_error("RequestTimeout", 400)),
        translate_boto_error(_client_error("BadGateway", 502)),  # OSError(EIO), cause says 502
        _client_error("SlowDown", 503),
        _client_error("ThrottlingException", 400),
        _client_error("TooManyRequests", 429),
        _client_error("503", 503, "HeadObject"),
        botocore.exceptions.EndpointConnectionError(endpoint_url="http://127.0.0.1:1/b/k"),
        botocore.exceptions.ConnectionClosedError(endpoint_url="http://127.0.0.1:1/b/k"),
        botocore.exceptions.ReadTimeoutError(endpoint_url="http://127.0.0.1:1/b/k"),
        botocore.exceptions.ConnectTimeoutError(endpoint_url="http://127.0.0.1:1/b/k"),
        aiohttp.ServerDisconnectedError(),
        ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused"),
        ConnectionResetError(errno.ECONNRESET, "Connection reset by peer"),
        ConnectionAbortedError(),
        BrokenPipeError(),
        TimeoutError(),
        FSTimeoutError(),  # fsspec: a call given a timeout ran out of it
        OSError(errno.EHOSTUNREACH, "No route to host"),
        _caused(RuntimeError("wrapped"), ConnectionResetError()),
    ],
    ids=repr,
)
def test_outages_are_transient(err: BaseException) -> None:
    assert is_transient_error(err)


@pytest.mark.parametrize(
    "err",
    [
        translate_boto_error(_client_error("NoSuchKey", 404, "GetObject")),
        translate_boto_error(_client_error("NoSuchBucket", 404)),
        translate_boto_error(_client_error("AccessDenied", 403)),
        translate_boto_error(_client_error("InvalidArgument", 400)),
        _client_error("404", 404, "HeadObject"),
        _client_error("InvalidAccessKeyId", 403),
        botocore.exceptions.SSLError(endpoint_url="https://x", error="certificate verify failed"),
        botocore.exceptions.NoCredentialsError(),
        FileNotFoundError(errno.ENOENT, "no such file"),
        PermissionError(errno.EACCES, "denied"),
        ValueError("bad path"),
        _caused(ValueError("bad JSON"), ConnectionResetError()),  # the answer decides
        OSError(errno.EIO, "an I/O error with no cause to judge by"),
        RuntimeError("anything else"),
    ],
    ids=repr,
)
def test_answers_are_not_transient(err: BaseException) -> None:
    assert not is_transient_error(err)


def test_waits_grow_exponentially_with_full_jitter() -> None:
    policy = StorageRetry(max_elapsed_s=60, base_s=0.5, max_delay_s=4.0)
    for retry, cap in [(1, 0.5), (2, 1.0), (3, 2.0), (4, 4.0), (10, 4.0), (1000, 4.0)]:
        waits = [policy.delay(retry) for _ in range(200)]
        assert all(0 <= w <= cap for w in waits)
        assert max(waits) > cap / 2 and min(waits) < cap / 2, "drawn from the whole range"
    with pytest.raises(ValueError, match="StorageRetry"):
        StorageRetry(base_s=0)


# ---- against a store that goes away ---------------------------------------------------------


@pytest.fixture
def proxy(s3_server: S3Location) -> Any:
    port = int(s3_server.endpoint_url.rsplit(":", 1)[1])
    with TcpProxy(port) as running:
        yield running


def _files(
    proxy: TcpProxy, s3_location: S3Location, retry: StorageRetry, quick: bool = True
) -> RootFS:
    options = {
        **s3_location.storage_options,
        "endpoint_url": proxy.url,
        "skip_instance_cache": True,
        **(_QUICK_CLIENT if quick else {}),
    }
    return RootFS(s3_location.root, options, retry=retry)


def _every_operation(files: RootFS, tmp_path: Path, name: str) -> dict[str, Any]:
    """Each RootFS call once, concurrently (as the shards of a step would)."""
    local = tmp_path / f"{name}.bin"
    local.write_bytes(b"uploaded " + name.encode())
    calls = {
        "write": lambda: files.write_bytes(f"{name}/written", b"written"),
        "write_json": lambda: files.write_json(f"{name}/doc.json", {"name": name}),
        "upload": lambda: files.put_file(local, f"{name}/uploaded"),
        "read": lambda: files.read_bytes("seed/a"),
        "read_missing": lambda: files.read_bytes("seed/missing"),
        "exists": lambda: files.exists("seed/a"),
        "list": lambda: files.list_names("seed"),
        "remove": lambda: files.remove("gone/b"),
    }
    with ThreadPoolExecutor(len(calls)) as pool:
        futures = {op: pool.submit(call) for op, call in calls.items()}
        return {op: future.result() for op, future in futures.items()}


# s3fs retries read timeouts itself, 5 times a call: about 7 s on an idle machine, over 9 s on a
# loaded one (a CI run with other jobs failed at 9 s with no RootFS retry at all). A hang must
# outlast that by a margin before RootFS sees it.
@pytest.mark.parametrize(("mode", "seconds"), [("refuse", 4), ("reset", 4), ("hang", 16)])
@pytest.mark.faults
def test_every_call_rides_out_a_short_outage(
    mode: OutageMode,
    seconds: float,
    proxy: TcpProxy,
    s3_location: S3Location,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    files = _files(proxy, s3_location, _QUICK_RETRY)
    files.write_bytes("seed/a", b"a")
    files.write_bytes("gone/b", b"b")
    connections_before = proxy.connections
    caplog.set_level(logging.WARNING, logger="avr_core.rootfs")

    proxy.go_down(mode)  # kills the pooled connections too
    healer = proxy.outage_in_background(after_s=0, seconds=seconds, mode=mode)
    started = time.monotonic()
    results = _every_operation(files, tmp_path, "during")
    took = time.monotonic() - started
    healer.join()

    assert took >= seconds - 0.5, "every call was made while the store was down"
    assert results["read"] == b"a" and results["read_missing"] is None
    assert results["exists"] is True and results["list"] == ["a"]
    assert files.read_bytes("during/written") == b"written"
    assert files.read_json("during/doc.json") == {"name": "during"}
    assert files.read_bytes("during/uploaded") == b"uploaded during"
    assert not files.exists("gone/b")
    assert proxy.connections > connections_before, "the client reconnected after the outage"
    retries = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert retries, "RootFS retried"
    expected = {"write": "during/written", "read": "seed/a", "list": "seed"}
    if mode == "hang":  # s3fs's own retries of read timeouts outlast the outage for most calls
        expected = {"list": "seed"}
    for operation, where in expected.items():
        named = [m for m in retries if f"storage {operation} {s3_location.root}/{where} " in m]
        assert named, f"no retry of {operation} logged in {retries}"
        assert "attempt 1" in named[0] and "retrying in" in named[0]


@pytest.mark.faults
def test_an_outage_longer_than_the_budget_fails_naming_the_object(
    proxy: TcpProxy, s3_location: S3Location
) -> None:
    files = _files(proxy, s3_location, StorageRetry(max_elapsed_s=1.5, base_s=0.2, max_delay_s=0.5))
    files.write_bytes("x", b"before")
    proxy.go_down("refuse")
    started = time.monotonic()
    with pytest.raises(StorageUnreachableError, match=rf"write {s3_location.root}/x: .*after"):
        files.write_bytes("x", b"during")
    assert 1.5 <= time.monotonic() - started < 10
    with pytest.raises(StorageUnreachableError, match=rf"read {s3_location.root}/x"):
        files.read_bytes("x")
    proxy.come_up()
    assert files.read_bytes("x") == b"before", "the failed write left the old object"
    files.write_bytes("x", b"after")  # the same RootFS works again
    assert files.read_bytes("x") == b"after"


def test_answers_are_not_retried(
    proxy: TcpProxy, s3_location: S3Location, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="avr_core.rootfs")
    files = _files(proxy, s3_location, _QUICK_RETRY)
    started = time.monotonic()
    assert files.read_bytes("never-written") is None
    assert files.list_names("never-written") == []
    missing_bucket = RootFS("s3://no-such-bucket-avr/x", files.storage_options, retry=_QUICK_RETRY)
    with pytest.raises(FileNotFoundError):
        missing_bucket.write_bytes("y", b"y")
    assert time.monotonic() - started < 5
    assert not caplog.records


def test_local_disk_errors_are_not_retried(tmp_path: Path) -> None:
    (tmp_path / "blocker").write_text("a file where a directory should be")
    files = RootFS(str(tmp_path), retry=StorageRetry(max_elapsed_s=60))
    started = time.monotonic()
    with pytest.raises(OSError):
        files.write_bytes("blocker/x", b"x")
    assert time.monotonic() - started < 1


def test_check_reachable_does_not_wait_out_a_dead_endpoint(s3_location: S3Location) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # nothing listens there once closed
    options = {**s3_location.storage_options, "endpoint_url": f"http://127.0.0.1:{port}"}
    files = RootFS(s3_location.root, {**options, **_QUICK_CLIENT})  # default 180 s budget
    started = time.monotonic()
    with pytest.raises(StorageUnreachableError, match="is not usable: EndpointConnectionError"):
        files.check_reachable()
    assert time.monotonic() - started < 15


@pytest.mark.slow
@pytest.mark.faults
def test_a_30s_outage_with_the_client_as_shipped(
    proxy: TcpProxy,
    s3_location: S3Location,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """s3fs and botocore retries as they ship (3-11 s per attempt on a refused endpoint) and the
    default policy: an outage twice as long as the 15 s Prefect's task retry used to cover."""
    files = _files(proxy, s3_location, StorageRetry(), quick=False)
    files.write_bytes("seed/a", b"a")
    files.write_bytes("gone/b", b"b")
    caplog.set_level(logging.WARNING, logger="avr_core.rootfs")
    healer = proxy.outage_in_background(after_s=0, seconds=30, mode="refuse")
    time.sleep(0.2)
    results = _every_operation(files, tmp_path, "during")
    healer.join()
    assert results["read"] == b"a" and files.read_bytes("during/written") == b"written"
    assert not files.exists("gone/b")
    assert any("retrying in" in r.getMessage() for r in caplog.records)
