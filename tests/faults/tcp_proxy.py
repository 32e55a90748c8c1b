"""A loopback TCP proxy that can go down and come back: network outages for tests.

    with TcpProxy(target_port) as proxy:          # listens on 127.0.0.1:proxy.port
        client = make_client(proxy.url)           # http://127.0.0.1:PORT, forwards to target_port
        proxy.outage(5)                           # down for 5 s (blocking), then healed
        proxy.outage_in_background(after_s=1, seconds=60, mode="reset").join()

Going down always kills the connections already open (each gets a TCP reset), so a client cannot
ride out the outage on a keep-alive connection. What a new connection sees depends on the mode:

* "refuse": the listening socket is closed, connect() fails with ECONNREFUSED (a stopped server).
* "reset": connect() succeeds, then the connection is reset (a crashing server or load balancer).
* "hang": connect() succeeds, the request is read and never answered (a stuck server); the
  connection is reset when the proxy comes back up.

Everything runs on one asyncio loop in a daemon thread; the methods are safe to call from any
other thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
import time
from collections.abc import Coroutine
from types import TracebackType
from typing import Any, Literal, TypeVar

__all__ = ["OutageMode", "TcpProxy"]

OutageMode = Literal["refuse", "reset", "hang"]
_T = TypeVar("_T")
_CHUNK = 64 * 1024


class TcpProxy:
    """Forwards 127.0.0.1:`port` to `target_host`:`target_port` until told to go down."""

    def __init__(self, target_port: int, target_host: str = "127.0.0.1", port: int = 0) -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.port = port  # 0: a free port is picked at start and kept across outages
        self.mode: OutageMode | None = None  # the current outage's mode; None while up
        self.connections = 0  # connections accepted and forwarded
        self.dropped = 0  # connections killed by an outage or accepted while down
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None
        # Live connections: the writer towards the client -> the writer towards the target.
        self._open: dict[asyncio.StreamWriter, asyncio.StreamWriter | None] = {}

    # -- life cycle --------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """http://127.0.0.1:PORT, for clients (an S3 endpoint_url) that should go through here."""
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> TcpProxy:
        """Start listening (returns self, so `proxy = TcpProxy(p).start()` works)."""
        self._thread.start()
        self._call(self._listen())
        return self

    def stop(self) -> None:
        """Close the listener and every connection, and stop the loop thread."""
        if not self._thread.is_alive():
            return
        self._call(self._close_listener())
        self._call(self._kill_all())
        self._call(self._finish_handlers())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    def __enter__(self) -> TcpProxy:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- outages -----------------------------------------------------------------------------

    def go_down(self, mode: OutageMode = "refuse") -> None:
        """Start an outage: kill open connections; new ones are refused, reset or left hanging."""
        if mode not in ("refuse", "reset", "hang"):
            raise ValueError(f"unknown outage mode {mode!r}: refuse, reset or hang")
        self.mode = mode
        if mode == "refuse":
            self._call(self._close_listener())
        self._call(self._kill_all())

    def come_up(self) -> None:
        """End the outage: listen again on the same port and forward new connections."""
        if self.mode is None:
            return
        if self.mode == "refuse":
            self._call(self._listen())
        self.mode = None
        self._call(self._kill_all())  # "hang" connections held until now get their reset

    def outage(self, seconds: float, mode: OutageMode = "refuse") -> None:
        """Be down for `seconds` (blocking), then come back up."""
        self.go_down(mode)
        try:
            time.sleep(seconds)
        finally:
            self.come_up()

    def outage_in_background(
        self, after_s: float, seconds: float, mode: OutageMode = "refuse"
    ) -> threading.Thread:
        """An outage of `seconds` starting `after_s` from now, from a daemon thread (join it to
        wait for the proxy to be back up)."""

        def run() -> None:
            time.sleep(after_s)
            self.outage(seconds, mode)

        thread = threading.Thread(target=run, name="tcp-proxy-outage", daemon=True)
        thread.start()
        return thread

    # -- the loop thread ---------------------------------------------------------------------

    def _call(self, coro: Coroutine[Any, Any, _T]) -> _T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=30)

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(
            self._handle, "127.0.0.1", self.port, reuse_address=True
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def _close_listener(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def _kill_all(self) -> None:
        for client, upstream in list(self._open.items()):
            self.dropped += 1
            _reset(client)
            if upstream is not None:
                _reset(upstream)
        self._open.clear()

    async def _finish_handlers(self) -> None:
        # Killed connections end their handlers; anything left after a moment is cancelled.
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=2)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await self._serve(reader, writer)
        except asyncio.CancelledError:
            _reset(writer)  # only when the proxy stops: nothing awaits this handler

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.mode == "reset":
            self.dropped += 1
            _reset(writer)
            return
        self._open[writer] = None
        if self.mode == "hang":
            # Read and discard until the client gives up or the proxy comes back up.
            with contextlib.suppress(OSError):
                while await reader.read(_CHUNK):
                    pass
            return
        try:
            upstream_reader, upstream = await asyncio.open_connection(
                self.target_host, self.target_port
            )
        except OSError:
            self._open.pop(writer, None)
            _reset(writer)
            return
        if writer not in self._open:  # killed by an outage while connecting upstream
            _reset(upstream)
            return
        self._open[writer] = upstream
        self.connections += 1
        try:
            await asyncio.gather(_pump(reader, upstream), _pump(upstream_reader, writer))
        finally:
            self._open.pop(writer, None)
            upstream.close()
            writer.close()


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Copy one direction until EOF or an error; then pass the EOF on (half close)."""
    try:
        while data := await reader.read(_CHUNK):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except OSError:
        writer.transport.abort()


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP RST rather than a FIN: the client sees 'connection reset by peer'."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()
