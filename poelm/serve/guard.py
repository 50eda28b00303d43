"""Connection limits of `poelm serve`: idle sockets cannot pile up and take the server down.

    sock = bind_socket("127.0.0.1", 8000)            # before the model loads: a busy port is one line
    cap = fit_fd_limit(None)                         # 1024, or fewer under a low `ulimit -Hn`
    guard = ConnectionGuard(max_connections=cap, header_timeout_s=10.0)
    uvicorn.Config(app, http=guard.protocol(), ...)  # uvicorn's h11 protocol with the limits below

- A header deadline: a connection that has not sent a whole request header within
  header_timeout_s of opening (or of its previous response, when kept alive) is closed, however
  slowly it trickles bytes in. uvicorn's own keep-alive timer is reset by any byte, so half a
  header would hold a socket forever.
- A connection cap: at max_connections open connections a new one closes the oldest that is
  still waiting for its header (or the new one itself when every connection runs a request), so
  open files stay below the process limit and an authorised request still gets in.
- Events that a flood repeats (the cap reached, `accept()` out of file descriptors) are logged
  as one line a minute with the count since, never once per connection.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import socket
import sys
import time

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

MAX_HEADER_BYTES = 16 * 1024  # h11's limit on a request header (431/400 beyond)
FD_HEADROOM = 256  # open files besides client connections: model files, the listener, torch, logs
BACKLOG = 128  # the listen queue, which is also the most connections asyncio accepts per loop iteration
ACCEPT_BURST = 4 * BACKLOG  # connections accepted before the cap sees them (accept -> connection_made -> close)
DEFAULT_CONNECTIONS = 1024
LOG_EVERY_S = 60.0


class RateLimitedLog:
    """One stderr line per kind of event per `every_s`, with the number of events since the last line."""

    def __init__(self, every_s: float = LOG_EVERY_S):
        self.every_s = every_s
        self.last: dict[str, float] = {}
        self.unlogged: dict[str, int] = {}

    def event(self, kind: str, line: str) -> None:
        now = time.monotonic()
        if kind in self.last and now - self.last[kind] < self.every_s:
            self.unlogged[kind] = self.unlogged.get(kind, 0) + 1
            return
        since = self.unlogged.pop(kind, 0)
        more = f" ({since} more since the last report)" if since else ""
        print(f"poelm serve: {line}{more}; reported at most once a minute", file=sys.stderr, flush=True)
        self.last[kind] = now


class ConnectionGuard:
    """What a server's connections share: the open ones (oldest first), the limits and the log."""

    def __init__(self, max_connections: int, header_timeout_s: float, log: RateLimitedLog | None = None):
        self.max_connections, self.header_timeout_s = max_connections, header_timeout_s
        self.log = log or RateLimitedLog()
        self.open: dict[GuardedH11, None] = {}  # insertion order: oldest first

    def protocol(self):
        """The protocol factory for uvicorn.Config(http=...)."""
        return functools.partial(GuardedH11, guard=self)

    def opened(self, conn: GuardedH11) -> None:
        if len(self.open) >= self.max_connections:
            victim = next((c for c in self.open if c.waiting()), conn)  # else: every open one runs a request
            self.log.event("cap", f"{len(self.open)} connections are open (--max-connections {self.max_connections}); "
                                  "closing the oldest idle one or refusing new ones")
            self.closed(victim)
            victim.close()
            if victim is conn:
                return
        self.open[conn] = None

    def closed(self, conn: GuardedH11) -> None:
        self.open.pop(conn, None)

    def loop_exception(self, loop: asyncio.AbstractEventLoop, context: dict) -> None:
        """The event loop's exception handler: out-of-files accept errors become a rate-limited line."""
        if context.get("message", "").startswith("socket.accept() out of system resource"):
            self.log.event("accept", f"cannot accept connections: {context.get('exception')} (raise `ulimit -n` "
                                     "or lower --max-connections)")
        else:
            loop.default_exception_handler(context)


class GuardedH11(H11Protocol):
    """uvicorn's h11 protocol with ConnectionGuard's header deadline and connection cap."""

    def __init__(self, *args, guard: ConnectionGuard, **kwargs):
        super().__init__(*args, **kwargs)
        self.guard = guard
        self.deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:
        super().connection_made(transport)
        self.guard.opened(self)
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        self.guard.closed(self)
        super().connection_lost(exc)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm()  # a kept-alive connection has header_timeout_s for its next request

    def waiting(self) -> bool:
        """Whether no request runs: the client has not sent a whole header since the last response."""
        return self.conn.their_state is h11.IDLE

    def close(self) -> None:
        self._disarm()
        if not self.transport.is_closing():
            self.transport.close()

    def _arm(self) -> None:
        self._disarm()
        if not self.transport.is_closing():
            self.deadline = self.loop.call_later(self.guard.header_timeout_s, self._expire)

    def _disarm(self) -> None:
        if self.deadline is not None:
            self.deadline.cancel()
            self.deadline = None

    def _expire(self) -> None:
        self.deadline = None
        if self.waiting():
            self.close()


def bind_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to host:port (uvicorn listens on it), or ValueError naming the flag."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except (socket.gaierror, UnicodeError) as e:
        raise ValueError(f"--host {host!r} is not an address this machine can listen on ({e}); use an IP "
                         "address such as 127.0.0.1 or 0.0.0.0") from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restart may reuse a port in TIME_WAIT
        sock.bind(address)
    except OSError as e:
        sock.close()
        hint = {errno.EADDRINUSE: f"--port {port} is in use (another server?); pick a free --port",
                errno.EACCES: f"--port {port} needs privileges this process lacks; pick a port above 1023",
                errno.EADDRNOTAVAIL: f"--host {host} is not an address of this machine; use 127.0.0.1 or 0.0.0.0"}
        raise ValueError(hint.get(e.errno, f"cannot listen on --host {host} --port {port}: {e.strerror or e}")) from None
    return sock


def fit_fd_limit(max_connections: int | None) -> int:
    """The connection cap (None: DEFAULT_CONNECTIONS, less where the open-file limit is lower),
    raising this process's soft open-file limit to fit it; ValueError when the hard limit is below."""
    try:
        import resource
    except ImportError:  # not a POSIX system: the platform's limit applies
        return max_connections or DEFAULT_CONNECTIONS
    spare = FD_HEADROOM + ACCEPT_BURST
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    room = None if hard == resource.RLIM_INFINITY else hard - spare  # None: no bound
    if max_connections is None:
        max_connections = DEFAULT_CONNECTIONS if room is None else min(DEFAULT_CONNECTIONS, room)
        if max_connections < 1:
            raise ValueError(f"this process may open at most {hard} files (ulimit -Hn), too few to serve; raise it "
                             f"above {spare}")
    elif room is not None and max_connections > room:
        raise ValueError(f"--max-connections {max_connections} needs {max_connections + spare} open files but this "
                         f"process may open at most {hard} (ulimit -Hn); raise that or lower --max-connections")
    if soft != resource.RLIM_INFINITY and soft < max_connections + spare:
        resource.setrlimit(resource.RLIMIT_NOFILE, (max_connections + spare, hard))
    return max_connections
