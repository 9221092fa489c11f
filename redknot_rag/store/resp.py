"""A minimal RESP2 client for the Redis tier's bulk reads: MGET replies read straight into the
caller's buffers (pinned host memory), one copy from the socket, the GIL released in `recv_into`.

redis-py's pure-Python parser copies a reply's bytes several times under the GIL (socket buffer,
BytesIO, slices), which caps a multi-MB MGET at a few hundred MB/s however many threads read. This
client does only what the tier's hot path needs: connect (AUTH, SELECT), send one MGET, read the
reply value by value into buffers the caller picks once it knows the sizes. Anything else goes
through redis-py. One connection per thread (`threading.local`); after any error the connection is
closed (its stream position is unknown) and the next call reconnects.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import unquote, urlparse


class RespError(ConnectionError):
    """The server replied with an error, or the reply broke the protocol."""


@dataclass(frozen=True)
class RespAddress:
    host: str
    port: int
    db: int
    username: str | None
    password: str | None

    @classmethod
    def from_url(cls, url: str) -> RespAddress | None:
        """`redis://[[user]:password@]host[:port][/db]`; None for anything else (unix sockets, TLS)."""
        u = urlparse(url)
        if u.scheme != "redis" or not u.hostname:
            return None
        path = u.path.strip("/")
        return cls(
            u.hostname,
            u.port or 6379,
            int(path) if path else 0,
            unquote(u.username) if u.username else None,
            unquote(u.password) if u.password else None,
        )


def _command(*args: bytes) -> bytes:
    return b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in args)


class RespReader:
    """One connection's reply stream: lines through a small buffer, bulk bytes straight into views."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._buf = bytearray()  # received, not yet consumed

    def _fill(self) -> None:
        chunk = self.sock.recv(1 << 16)
        if not chunk:
            raise ConnectionError("redis closed the connection")
        self._buf += chunk

    def line(self) -> bytes:
        """One reply line, without its CRLF; an error reply raises RespError."""
        while (i := self._buf.find(b"\r\n")) < 0:
            self._fill()
        out = bytes(self._buf[:i])
        del self._buf[: i + 2]
        if out[:1] == b"-":
            raise RespError(out[1:].decode(errors="replace"))
        return out

    def header(self, kind: bytes) -> int:
        """The length of the next `*` (array) or `$` (bulk) reply; -1 for a null."""
        ln = self.line()
        if ln[:1] != kind:
            raise RespError(f"expected a {kind!r} reply, got {ln[:40]!r}")
        return int(ln[1:])

    def read_into(self, dst: memoryview) -> None:
        """Fill `dst` with the next `dst.nbytes` bytes of the stream."""
        n = dst.nbytes
        have = min(n, len(self._buf))
        if have:
            dst[:have] = self._buf[:have]
            del self._buf[:have]
        while have < n:
            got = self.sock.recv_into(dst[have:], n - have)
            if got == 0:
                raise ConnectionError("redis closed the connection")
            have += got

    def bulk_bytes(self, n: int) -> bytes:
        out = bytearray(n)
        self.read_into(memoryview(out))
        self.end_bulk()
        return bytes(out)

    def skip(self, n: int) -> None:
        """Consume n bytes of a bulk value, and its CRLF."""
        while n > 0:
            k = min(n, 1 << 20)
            self.read_into(memoryview(bytearray(k)))
            n -= k
        self.end_bulk()

    def end_bulk(self) -> None:
        crlf = bytearray(2)
        self.read_into(memoryview(crlf))
        if crlf != b"\r\n":
            raise RespError("bulk reply not terminated by CRLF")


class RespClient:
    """Thread-local raw connections to one Redis server for bulk MGETs."""

    def __init__(self, address: RespAddress, timeout_s: float) -> None:
        self.address = address
        self.timeout_s = timeout_s
        self._local = threading.local()

    def _reader(self) -> RespReader:
        reader: RespReader | None = getattr(self._local, "reader", None)
        if reader is not None:
            return reader
        a = self.address
        sock = socket.create_connection((a.host, a.port), timeout=self.timeout_s)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        reader = RespReader(sock)
        try:
            if a.password is not None:
                auth = (a.username.encode(), a.password.encode()) if a.username else (a.password.encode(),)
                sock.sendall(_command(b"AUTH", *auth))
                reader.line()
            if a.db:
                sock.sendall(_command(b"SELECT", str(a.db).encode()))
                reader.line()
        except BaseException:
            sock.close()
            raise
        self._local.reader = reader
        return reader

    def mget(self, keys: Sequence[str]) -> RespReader:
        """Send MGET and read the array header; the caller reads `len(keys)` values off the reader
        (`header(b"$")`, then `read_into`/`bulk_bytes`/`skip`), inside `session()`'s error handling."""
        reader = self._reader()
        reader.sock.sendall(_command(b"MGET", *(k.encode() for k in keys)))
        if reader.header(b"*") != len(keys):
            raise RespError("MGET reply of another length")
        return reader

    def drop(self) -> None:
        """Close this thread's connection (after an error: the stream position is unknown)."""
        reader = getattr(self._local, "reader", None)
        self._local.reader = None
        if reader is not None:
            try:
                reader.sock.close()
            except OSError:
                pass
