"""One fsspec root: URI <-> path math and atomic whole-file reads and writes beneath it.

Every file the factory writes (shards, manifests, records, checkpoint files) goes through
`RootFS.write_bytes`, which makes a file appear whole or not at all: on a local disk it is written
under a hidden temporary name, fsynced and renamed; on an object store it is one PUT (a multipart
upload, too, becomes visible only when it completes).

On an object store every call rides out an outage: a transient error (`is_transient_error`:
connection refused/reset, timeouts, HTTP 5xx, throttling) is retried with exponential backoff and
full jitter for up to `StorageRetry.max_elapsed_s`, each retry logged as a warning; then the call
fails with a `StorageUnreachableError` naming the object. Retrying is safe because every write is
a whole-object PUT (or a rename on a local disk) and removing a missing object is not an error.
Local disks are never retried: their errors do not go away by waiting.
"""

from __future__ import annotations

import copy
import errno
import json
import logging
import os
import posixpath
import random
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import fsspec
from fsspec.implementations.local import LocalFileSystem
from pydantic import BaseModel

from avr_core.hashing import json_default

__all__ = [
    "RootFS",
    "StorageError",
    "StorageRetry",
    "StorageUnreachableError",
    "is_transient_error",
]

logger = logging.getLogger(__name__)
_T = TypeVar("_T")


class StorageError(RuntimeError):
    """Stored data is missing, inconsistent, or was changed behind the store's back."""


class StorageUnreachableError(StorageError):
    """The store root cannot be written or read (no such bucket, no permission, no endpoint)."""


@dataclass(frozen=True)
class StorageRetry:
    """How long one storage call keeps retrying transient errors of an object store.

    The wait before retry n (1, 2, ...) is drawn uniformly from [0, min(max_delay_s,
    base_s * 2**(n-1))] ("full jitter": workers that lost the store together do not come back in
    lockstep). Each attempt also carries the client's own retries (s3fs and botocore: about 3-11 s
    against a refused endpoint), so an outage of `max_elapsed_s` is ridden out with some margin.
    """

    max_elapsed_s: float = 180.0
    """Give up once a call has been failing for this long (0: one attempt, its error as is)."""
    base_s: float = 0.5
    """Upper bound of the first wait; doubles with every retry."""
    max_delay_s: float = 20.0
    """Upper bound of any one wait."""

    def __post_init__(self) -> None:
        if self.max_elapsed_s < 0 or self.base_s <= 0 or self.max_delay_s < self.base_s:
            raise ValueError(
                f"StorageRetry needs max_elapsed_s >= 0 and 0 < base_s <= max_delay_s, got {self}"
            )

    def delay(self, retry: int) -> float:
        """Seconds to wait before retry number `retry` (1 for the first)."""
        cap = min(self.max_delay_s, self.base_s * 2.0 ** min(retry - 1, 60))
        return random.uniform(0.0, cap)


# Exception classes (module.qualname, anywhere in an error's MRO or cause chain) that mean the
# store could not be reached or did not answer. Matched by name so that this module imports
# neither botocore nor aiohttp. s3fs raises botocore's EndpointConnectionError as is once its
# own retries give up on a refused or unreachable endpoint.
_TRANSIENT_CLASSES = frozenset(
    {
        "botocore.exceptions.EndpointConnectionError",
        "botocore.exceptions.ConnectTimeoutError",
        "botocore.exceptions.ProxyConnectionError",
        "botocore.exceptions.HTTPClientError",  # ConnectionClosedError, ReadTimeoutError
        "botocore.exceptions.IncompleteReadError",
        # Rate limiting sometimes answers with invalid XML (s3fs retries this too).
        "botocore.parsers.ResponseParserError",
        "aiohttp.client_exceptions.ClientConnectionError",  # incl. ServerDisconnectedError
        "aiohttp.client_exceptions.ClientPayloadError",
    }
)
# A certificate or TLS configuration problem does not heal by waiting.
_PERMANENT_CLASSES = frozenset(
    {"botocore.exceptions.SSLError", "aiohttp.client_exceptions.ClientSSLError"}
)
# Service error codes that mean "try again later", whatever their HTTP status.
_TRANSIENT_CODES = frozenset(
    {
        "SlowDown",
        "ServiceUnavailable",
        "InternalError",
        "RequestTimeout",
        "OperationAborted",
        "Throttling",
        "ThrottlingException",
        "RequestThrottled",
        "RequestLimitExceeded",
        "TooManyRequestsException",
    }
)
# What s3fs turns the codes above into (s3fs.errors.translate_boto_error), and socket errors.
_TRANSIENT_ERRNOS = frozenset(
    {
        errno.EBUSY,  # SlowDown, ServiceUnavailable, OperationAborted
        errno.EREMOTEIO,  # InternalError
        errno.EAGAIN,
        errno.ETIMEDOUT,
        errno.ECONNREFUSED,
        errno.ECONNRESET,
        errno.ECONNABORTED,
        errno.EPIPE,
        errno.ENETDOWN,
        errno.ENETUNREACH,
        errno.EHOSTDOWN,
        errno.EHOSTUNREACH,
    }
)
# Errors that are an answer, not an outage: retrying cannot change them.
_PERMANENT_TYPES = (
    FileNotFoundError,
    FileExistsError,
    PermissionError,
    IsADirectoryError,
    NotADirectoryError,
    ValueError,
    TypeError,
    NotImplementedError,
    StorageError,
)


def is_transient_error(err: BaseException) -> bool:
    """Whether a remote storage call that raised `err` may succeed if simply tried again.

    Yes for connection failures (refused, reset, aborted, unreachable), timeouts, HTTP 5xx and
    429, and throttling codes (503 SlowDown), whether raised by botocore/aiohttp directly or
    translated into an OSError by s3fs (the original error is then its cause). No for answers
    such as a missing object or bucket, a denied permission, or a bad request.
    """
    if isinstance(err, _PERMANENT_TYPES):
        return False
    seen: set[int] = set()
    todo: list[BaseException] = [err]
    while todo:
        current = todo.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        verdict = _classify_one(current)
        if verdict is not None:
            return verdict
        todo.extend(e for e in (current.__cause__, current.__context__) if e is not None)
    return False


def _classify_one(err: BaseException) -> bool | None:
    """True/False when `err` alone decides; None to look at its cause and context."""
    names = {f"{cls.__module__}.{cls.__qualname__}" for cls in type(err).__mro__}
    if names & _PERMANENT_CLASSES:
        return False
    if names & _TRANSIENT_CLASSES:
        return True
    response = getattr(err, "response", None)
    if isinstance(response, dict) and ("Error" in response or "ResponseMetadata" in response):
        # A botocore ClientError: the service answered; its status and code say whether to wait.
        code = str(response.get("Error", {}).get("Code", ""))
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if not isinstance(status, int) and code.isdigit():
            status = int(code)  # a HEAD has no body: its code is the status ("503")
        return code in _TRANSIENT_CODES or (
            isinstance(status, int) and (status >= 500 or status == 429)
        )
    if isinstance(err, (ConnectionError, TimeoutError)):  # incl. socket.timeout, FSTimeoutError
        return True
    if isinstance(err, OSError) and err.errno in _TRANSIENT_ERRNOS:
        return True
    return None


class RootFS:
    """Files under one root URI (`file://`, `s3://`, any fsspec URL; a plain path = local disk).

    `retry` bounds how long each call rides out an outage of a remote store (default: 3 minutes;
    ignored on a local disk).
    """

    def __init__(
        self,
        root: str,
        storage_options: dict[str, Any] | None = None,
        *,
        retry: StorageRetry | None = None,
    ) -> None:
        self.retry: StorageRetry = retry if retry is not None else StorageRetry()
        self.storage_options: dict[str, Any] = dict(storage_options or {})
        has_protocol = "://" in root
        self.root: str = root.rstrip("/") if has_protocol else os.path.abspath(root)
        self.fs, base = fsspec.core.url_to_fs(self.root, **self.storage_options)
        self.base: str = base.rstrip("/")
        self.is_local = isinstance(self.fs, LocalFileSystem)

    def __repr__(self) -> str:
        return f"RootFS({self.root!r})"

    def with_retry(self, retry: StorageRetry) -> RootFS:
        """The same root and filesystem object with another retry policy."""
        other = copy.copy(self)
        other.retry = retry
        return other

    def _call(self, operation: str, where: str, call: Callable[[], _T]) -> _T:
        """`call()`, retried on transient errors of a remote store as `self.retry` allows.

        The same filesystem object is used again: after an outage its client opens new
        connections (tests/test_rootfs_retry.py checks this through a proxy that kills them).
        """
        started = time.monotonic()
        attempt = 1
        while True:
            try:
                return call()
            except Exception as err:
                if self.is_local or not self.retry.max_elapsed_s or not is_transient_error(err):
                    raise
                uri = self.uri(self.relative(where))
                elapsed = time.monotonic() - started
                remaining = self.retry.max_elapsed_s - elapsed
                if remaining <= 0:
                    raise StorageUnreachableError(
                        f"{operation} {uri}: storage still unreachable after {elapsed:.0f} s and "
                        f"{attempt} attempt(s) (retry budget {self.retry.max_elapsed_s:.0f} s): "
                        f"{type(err).__name__}: {err}"
                    ) from err
                wait = min(self.retry.delay(attempt), remaining)
                logger.warning(
                    "storage %s %s failed (attempt %d, %.0f s so far): %s: %s; retrying in %.1f s",
                    operation,
                    uri,
                    attempt,
                    elapsed,
                    type(err).__name__,
                    err,
                    wait,
                )
                time.sleep(wait)
                attempt += 1

    # -- paths -------------------------------------------------------------------------------

    def relative(self, uri_or_relative: str) -> str:
        """Path relative to the root for a URI inside the root or an already relative path."""
        if uri_or_relative == self.root:
            return ""
        if uri_or_relative.startswith(self.root + "/"):
            return uri_or_relative[len(self.root) + 1 :]
        if "://" in uri_or_relative or os.path.isabs(uri_or_relative):
            raise ValueError(f"{uri_or_relative!r} is outside this store's root {self.root!r}")
        return uri_or_relative.strip("/")

    def path(self, uri_or_relative: str) -> str:
        """Filesystem path (what `self.fs` takes) of a URI or root-relative path."""
        relative = self.relative(uri_or_relative)
        return f"{self.base}/{relative}" if relative else self.base

    def uri(self, relative: str) -> str:
        """Full URI of a root-relative path."""
        return f"{self.root}/{relative}" if relative else self.root

    # -- whole files -------------------------------------------------------------------------

    def write_bytes(self, where: str, data: bytes) -> None:
        """Write a whole file so that readers see either nothing/the old file or all of `data`."""
        path = self.path(where)
        if self.is_local:
            directory, name = os.path.split(path)
            os.makedirs(directory, exist_ok=True)
            temp = os.path.join(directory, f".{name}.tmp-{uuid.uuid4().hex[:12]}")
            try:
                with open(temp, "wb") as handle:
                    handle.write(data)
                    handle.flush()
                    os.fsync(handle.fileno())
                os.replace(temp, path)
            finally:
                if os.path.exists(temp):
                    os.remove(temp)
        else:
            # One PUT: object stores expose an object only once its upload has completed.
            self._call("write", where, lambda: self.fs.pipe_file(path, data))

    def read_bytes(self, where: str) -> bytes | None:
        """The file's bytes, or None if it does not exist."""
        path = self.path(where)
        try:
            data: bytes = self._call("read", where, lambda: self.fs.cat_file(path))
        except FileNotFoundError:
            return None
        return data

    def put_file(self, local_file: Path, where: str) -> None:
        """Upload a local file (atomically on a local root; streamed on an object store)."""
        if self.is_local:
            self.write_bytes(where, local_file.read_bytes())
        else:
            path = self.path(where)
            self._call("upload", where, lambda: self.fs.put_file(str(local_file), path))

    def remove(self, where: str) -> None:
        """Delete a file if it exists."""
        path = self.path(where)

        def remove() -> None:
            # A listing cached before another process wrote `path` would hide it from exists().
            self.fs.invalidate_cache(path)
            if self.fs.exists(path):
                self.fs.rm_file(path)

        self._call("remove", where, remove)

    def exists(self, where: str) -> bool:
        """Whether a file or directory exists (never from a stale listing cache)."""
        path = self.path(where)

        def exists() -> bool:
            self.fs.invalidate_cache(path)
            return bool(self.fs.exists(path))

        return self._call("exists", where, exists)

    def _entries(self, where: str) -> list[dict[str, Any]]:
        """fsspec's detailed listing of a directory, fresh; empty if it does not exist."""
        directory = self.path(where)

        def list_entries() -> list[dict[str, Any]]:
            # Another process may have written here since this filesystem object cached the
            # listing.
            self.fs.invalidate_cache(directory)
            entries: list[dict[str, Any]] = self.fs.ls(directory, detail=True)
            return entries

        try:
            return self._call("list", where, list_entries)
        except FileNotFoundError:
            return []

    def list_names(self, where: str, kind: str | None = None) -> list[str]:
        """Base names directly under a directory (`kind` = "directory"/"file" filters); sorted."""
        return sorted(
            posixpath.basename(entry["name"].rstrip("/"))
            for entry in self._entries(where)
            if kind is None or entry.get("type") == kind
        )

    def list_versions(self, where: str) -> dict[str, str]:
        """Each file directly under a directory with a token that changes when the file is
        rewritten (size and modification time, or the object's ETag): one listing, no reads."""
        return {
            posixpath.basename(entry["name"].rstrip("/")): _version_token(entry)
            for entry in self._entries(where)
            if entry.get("type") == "file"
        }

    # -- JSON --------------------------------------------------------------------------------

    def write_json(self, where: str, obj: Any) -> None:
        """Write `obj` (JSON-able or pydantic) atomically."""
        data = obj.model_dump(mode="json") if isinstance(obj, BaseModel) else obj
        text = json.dumps(data, indent=2, sort_keys=True, default=json_default)
        self.write_bytes(where, text.encode("utf-8"))

    def read_json(self, where: str) -> Any | None:
        """The JSON at `where`, or None if there is none."""
        data = self.read_bytes(where)
        if data is None:
            return None
        try:
            return json.loads(data)
        except json.JSONDecodeError as err:
            raise StorageError(f"{self.uri(self.relative(where))}: bad JSON: {err}") from err

    def check_reachable(self) -> None:
        """Write, read back and delete a small probe under the root; fail clearly if that fails.

        A configuration check, so it does not wait out outages: a wrong endpoint is reported in
        seconds (the client's own retries), not after the retry budget.
        """
        probe = f".avr-probe-{uuid.uuid4().hex[:12]}"
        payload = b"avr-factory store probe"
        once = self.with_retry(StorageRetry(max_elapsed_s=0))
        try:
            if self.is_local:
                os.makedirs(self.base, exist_ok=True)
            once.write_bytes(probe, payload)
            readback = once.read_bytes(probe)
            once.remove(probe)
        except Exception as err:
            raise StorageUnreachableError(
                f"storage root {self.root!r} is not usable: {type(err).__name__}: {err}"
            ) from err
        if readback != payload:
            raise StorageUnreachableError(f"storage root {self.root!r} returned a different probe")


def _version_token(entry: dict[str, Any]) -> str:
    """What tells two versions of a listed file apart: local disks give a modification time,
    object stores a LastModified and an ETag."""
    stamp = entry.get("mtime", entry.get("LastModified", entry.get("last_modified", "")))
    return f"{entry.get('size')}:{stamp}:{entry.get('ETag', entry.get('etag', ''))}"
