"""A protocol-aware TCP proxy that injects faults at PostgreSQL protocol points.

It runs in the test's own event loop, between a client (asyncpg) and one
PostgreSQL server, and parses both directions into whole messages (see
/work/shared/FAULTS.md for the protocol facts). Usage::

    proxy = FaultProxy(node.host, node.port, target_dsn=node.dsn)
    await proxy.start()
    conn = await asyncpg.connect(proxy.dsn())  # the node's credentials, the proxy's address
    proxy.arm(Fault.CUT_AFTER_COMMIT, match="insert into orders")
    ...
    await proxy.aclose()

Faults:

``CUT_BEFORE_QUERY``
    The next matching client query (a simple ``Q``, or an extended-protocol group
    ``P``/``B``/``D``/``E``... up to its ``S`` Sync or ``H`` Flush) is never
    forwarded; both sides are closed.
``CUT_AFTER_COMMIT``
    The matching query is forwarded. When the server's CommandComplete ``C`` for
    it arrives (or PortalSuspended ``s``: asyncpg's ``fetchval``/``fetchrow`` execute
    with a row limit), nothing more is forwarded to the client; when the following
    ReadyForQuery ``Z`` arrives (so the server has finished the statement and its
    Sync: an autocommit statement has committed) both sides are closed without
    forwarding it. A group that executes nothing (asyncpg's prepare: P/D/S) does
    not consume the fault; the later Bind of that statement does. If the statement
    fails (``Z`` without ``C``) the fault is given back, still armed.
``CUT_IDLE``
    Close both sides of every open connection now (``cut_all()``; ``arm(CUT_IDLE)``
    does the same at once).
``BLACK_HOLE``
    ``black_hole()``: new connections are accepted and never answered; existing
    connections stop forwarding in both directions (nothing is closed, the bytes
    are held). ``arm(BLACK_HOLE, match=...)`` freezes only the connection that
    sends the matching query (the query is held, not forwarded). ``heal()``
    lets held bytes through again.

Matching (``match=``) is a case-insensitive substring test on the SQL text of a
``Q``, of a ``P`` in the group, or of the statement a ``B`` in the group binds
(statement names are tracked from ``P``, so a cached prepared statement that is
re-executed with only ``B``/``E``/``S`` matches too). ``match=None`` fires on the
next query (a ``Q``, or a group holding a ``P``, ``B`` or ``E``).
"""

from __future__ import annotations

import asyncio
import enum
import struct
import urllib.parse
from dataclasses import dataclass, field

__all__ = ["Fault", "FaultProxy", "retarget"]

SSL_REQUEST = 80877103
GSSENC_REQUEST = 80877104
CANCEL_REQUEST = 80877102

_READ_SIZE = 65536
_INT32 = struct.Struct("!i")


class Fault(enum.Enum):
    CUT_BEFORE_QUERY = "cut-before-query"
    CUT_AFTER_COMMIT = "cut-after-commit"
    CUT_IDLE = "cut-idle"
    BLACK_HOLE = "black-hole"


@dataclass
class _Armed:
    fault: Fault
    match: str | None  # lower-cased
    remaining: int

    def matches(self, texts: list[str]) -> bool:
        if self.match is None:
            return True
        return any(self.match in text.lower() for text in texts)


@dataclass(eq=False)
class _Connection:
    """One proxied client connection and its server connection."""

    client_w: asyncio.StreamWriter
    connect_delay: float
    server_w: asyncio.StreamWriter | None = None
    frozen: bool = False  # held by a matched BLACK_HOLE
    closed: bool = False
    # CUT_AFTER_COMMIT: the armed fault a forwarded statement reserved; cut at its 'C'.
    cut_pending: _Armed | None = None
    cutting: bool = False  # saw the 'C': drop everything, close at the 'Z'
    statements: dict[str, str] = field(default_factory=dict)
    task: asyncio.Task[None] | None = None

    def abort(self) -> None:
        self.closed = True
        for writer in (self.client_w, self.server_w):
            if writer is not None:
                writer.transport.abort()


def retarget(dsn: str, *addresses: str) -> str:
    """*dsn* (a ``postgres://`` URL) with its hosts replaced by *addresses* (``host:port``);
    user, password, database and parameters are kept."""
    parts = urllib.parse.urlsplit(dsn)
    userinfo = parts.netloc.rpartition("@")[0]
    hosts = ",".join(addresses)
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{userinfo}@{hosts}" if userinfo
                                                  else hosts))


def _cstring(data: bytes, start: int) -> tuple[str, int]:
    end = data.index(b"\0", start)
    return data[start:end].decode("utf-8", "replace"), end + 1


def _split_messages(buffer: bytearray) -> list[tuple[int, bytes]]:
    """Take every whole typed message off the front of *buffer*: (type, whole message)."""
    messages: list[tuple[int, bytes]] = []
    offset = 0
    while len(buffer) - offset >= 5:
        (length,) = _INT32.unpack_from(buffer, offset + 1)
        if length < 4:
            raise ConnectionError(f"bad message length {length}")
        end = offset + 1 + length
        if end > len(buffer):
            break
        messages.append((buffer[offset], bytes(buffer[offset:end])))
        offset = end
    del buffer[:offset]
    return messages


async def _read_untyped(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """A startup-phase packet (no type byte): (code, whole packet)."""
    head = await reader.readexactly(8)
    (length,) = _INT32.unpack_from(head, 0)
    if length < 8 or length > 1 << 20:
        raise ConnectionError(f"bad startup packet length {length}")
    rest = await reader.readexactly(length - 8)
    (code,) = _INT32.unpack_from(head, 4)
    return code, head + rest


class FaultProxy:
    """A fault-injecting PostgreSQL proxy in front of ``target_host:target_port``."""

    def __init__(self, target_host: str, target_port: int, *,
                 target_dsn: str | None = None) -> None:
        self._target = (target_host, target_port)
        #: The target's own DSN; ``dsn()`` aims it at the proxy (keeping the credentials).
        self.target_dsn = target_dsn
        self._server: asyncio.Server | None = None
        self._port = 0
        self._connections: set[_Connection] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._armed: list[_Armed] = []
        self._fired = 0
        self._black_hole = False
        self._connect_delay = 0.0
        self._reply_delay = 0.0
        self._closing = False
        self._changed: asyncio.Event | None = None

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        """Listen on 127.0.0.1, on a free port."""
        if self._server is not None:
            raise RuntimeError("FaultProxy already started")
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self._port = self._server.sockets[0].getsockname()[1]

    async def __aenter__(self) -> FaultProxy:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the listener and every connection; no socket or task is left behind."""
        self._closing = True
        if self._server is not None:
            self._server.close()
        for conn in list(self._connections):
            conn.abort()
        self._notify()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for conn in list(self._connections):  # any left by a task that never ran
            conn.abort()
        self._connections.clear()
        # Let the aborted transports run connection_lost (which closes their sockets).
        for _ in range(3):
            await asyncio.sleep(0)
        if self._server is not None:
            await self._server.wait_closed()

    # -- addresses ---------------------------------------------------------------------

    @property
    def host(self) -> str:
        return "127.0.0.1"

    @property
    def port(self) -> int:
        if not self._port:
            raise RuntimeError("FaultProxy not started")
        return self._port

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def dsn(self, template: str | None = None) -> str:
        """*template* (default: ``target_dsn``; a node's DSN, credentials and all) aimed
        at this proxy instead."""
        template = template if template is not None else self.target_dsn
        if template is None:
            return f"postgres://postgres@{self.address}/postgres"
        return retarget(template, self.address)

    # -- controls ----------------------------------------------------------------------

    def arm(self, fault: Fault, *, match: str | None = None, times: int = 1) -> None:
        """Fire *fault* on the next *times* client queries whose SQL contains *match*."""
        if times < 1:
            raise ValueError("times must be >= 1")
        if fault is Fault.CUT_IDLE:
            self.cut_all()
            return
        if fault is Fault.BLACK_HOLE and match is None:
            self.black_hole(True)
            return
        self._armed.append(_Armed(fault, None if match is None else match.lower(), times))

    def disarm(self) -> None:
        """Forget every armed fault that has not fired."""
        self._armed.clear()

    @property
    def armed(self) -> int:
        """How many armed fault firings are still pending."""
        return sum(a.remaining for a in self._armed)

    def cut_all(self) -> None:
        """CUT_IDLE: close both sides of every open proxied connection now."""
        for conn in list(self._connections):
            conn.abort()

    def black_hole(self, on: bool = True) -> None:
        self._black_hole = on
        self._notify()

    def delay_connect(self, seconds: float) -> None:
        """Delay the server's first bytes to new connections by *seconds* (0: off)."""
        self._connect_delay = max(0.0, seconds)

    def slow_replies(self, seconds: float) -> None:
        """Delay every server->client chunk by *seconds* (0: off)."""
        self._reply_delay = max(0.0, seconds)

    def heal(self) -> None:
        """Everything off: no armed faults, no black hole, no delays; held bytes flow."""
        self._armed.clear()
        self._black_hole = False
        self._connect_delay = 0.0
        self._reply_delay = 0.0
        for conn in self._connections:
            conn.frozen = False
        self._notify()

    @property
    def fired(self) -> int:
        """How many armed faults fired."""
        return self._fired

    @property
    def open_connections(self) -> int:
        return sum(1 for conn in self._connections if not conn.closed)

    # -- internals ---------------------------------------------------------------------

    def _notify(self) -> None:
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    async def _gate(self, conn: _Connection) -> None:
        """Wait while this connection is black-holed (held, not closed)."""
        while (self._black_hole or conn.frozen) and not conn.closed and not self._closing:
            if self._changed is None:
                self._changed = asyncio.Event()
            await self._changed.wait()
        if conn.closed or self._closing:
            raise ConnectionAbortedError("proxied connection closed")

    def _take(self, kinds: tuple[Fault, ...], texts: list[str]) -> _Armed | None:
        for armed in self._armed:
            if armed.remaining > 0 and armed.fault in kinds and armed.matches(texts):
                armed.remaining -= 1
                if armed.remaining == 0:
                    self._armed.remove(armed)
                return armed
        return None

    def _give_back(self, armed: _Armed) -> None:
        armed.remaining += 1
        if armed not in self._armed:
            self._armed.insert(0, armed)

    def _accept(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        conn = _Connection(client_w=client_w, connect_delay=self._connect_delay)
        if self._closing:
            conn.abort()
            return
        self._connections.add(conn)
        task = asyncio.get_running_loop().create_task(self._serve(conn, client_r))
        conn.task = task
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, conn: _Connection, client_r: asyncio.StreamReader) -> None:
        try:
            await self._gate(conn)  # black hole: accepted, never answered
            server_r, server_w = await asyncio.open_connection(*self._target)
            conn.server_w = server_w
            if conn.closed or self._closing:
                return
            typed = await self._startup(conn, client_r, server_r, server_w)
            pumps = [
                asyncio.ensure_future(self._client_to_server(conn, client_r, server_w, typed)),
                asyncio.ensure_future(self._server_to_client(conn, server_r, typed)),
            ]
            try:
                await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for pump in pumps:
                    pump.cancel()
                await asyncio.gather(*pumps, return_exceptions=True)
        except (OSError, EOFError, asyncio.IncompleteReadError, ConnectionError, ValueError):
            pass
        finally:
            conn.abort()
            self._connections.discard(conn)
            for writer in (conn.client_w, conn.server_w):
                if writer is not None:
                    writer.close()

    async def _startup(self, conn: _Connection, client_r: asyncio.StreamReader,
                       server_r: asyncio.StreamReader,
                       server_w: asyncio.StreamWriter) -> bool:
        """Relay the untyped startup packets; whether the rest is typed messages."""
        code, packet = await _read_untyped(client_r)
        await self._gate(conn)
        server_w.write(packet)
        if code in (SSL_REQUEST, GSSENC_REQUEST):
            answer = await server_r.readexactly(1)
            await self._first_server_bytes(conn)
            conn.client_w.write(answer)
            if answer != b"N":
                return False  # TLS or GSS from here on: relay raw bytes
            code, packet = await _read_untyped(client_r)
            await self._gate(conn)
            server_w.write(packet)
        # A CancelRequest (or anything but a StartupMessage) is relayed raw.
        return code >> 16 == 3

    async def _first_server_bytes(self, conn: _Connection) -> None:
        delay, conn.connect_delay = conn.connect_delay, 0.0
        if delay > 0:
            await asyncio.sleep(delay)
        await self._gate(conn)

    async def _client_to_server(self, conn: _Connection, reader: asyncio.StreamReader,
                                writer: asyncio.StreamWriter, typed: bool) -> None:
        buffer = bytearray()
        group: list[bytes] = []
        texts: list[str] = []
        executes = False
        while data := await reader.read(_READ_SIZE):
            if not typed:
                await self._gate(conn)
                writer.write(data)
                await writer.drain()
                continue
            buffer += data
            out = bytearray()
            for kind, message in _split_messages(buffer):
                if kind == ord("Q"):
                    text, _ = _cstring(message, 5)
                    if not self._decide(conn, [text], executes=True):
                        return  # cut: nothing is forwarded
                    out += message
                    continue
                if kind == ord("P"):
                    name, at = _cstring(message, 5)
                    query, _ = _cstring(message, at)
                    conn.statements[name] = query
                    texts.append(query)
                elif kind == ord("B"):
                    _, at = _cstring(message, 5)
                    statement, _ = _cstring(message, at)
                    texts.append(conn.statements.get(statement, ""))
                elif kind == ord("E"):
                    executes = True
                elif kind == ord("C") and message[5:6] == b"S":
                    name, _ = _cstring(message, 6)
                    conn.statements.pop(name, None)
                elif kind not in (ord("D"), ord("S"), ord("H")) and not group:
                    out += message  # outside any group: Terminate, copy data, ...
                    continue
                group.append(message)
                if kind in (ord("S"), ord("H")):  # the group is complete: decide
                    if (texts or executes) and not self._decide(conn, texts, executes):
                        return
                    out += b"".join(group)
                    group.clear()
                    texts.clear()
                    executes = False
            if out:
                await self._gate(conn)
                writer.write(out)
                await writer.drain()

    def _decide(self, conn: _Connection, texts: list[str], executes: bool) -> bool:
        """Apply a fault to a query about to be forwarded; False: the connection is cut."""
        if not self._armed:
            return True
        kinds: tuple[Fault, ...] = (Fault.CUT_BEFORE_QUERY, Fault.BLACK_HOLE)
        if executes and conn.cut_pending is None:
            kinds += (Fault.CUT_AFTER_COMMIT,)
        armed = self._take(kinds, texts)
        if armed is None:
            return True
        if armed.fault is Fault.CUT_BEFORE_QUERY:
            self._fired += 1
            conn.abort()
            return False
        if armed.fault is Fault.BLACK_HOLE:
            self._fired += 1
            conn.frozen = True  # the query is held at the gate
            return True
        conn.cut_pending = armed
        return True

    async def _server_to_client(self, conn: _Connection, reader: asyncio.StreamReader,
                                typed: bool) -> None:
        buffer = bytearray()
        writer = conn.client_w
        while data := await reader.read(_READ_SIZE):
            if conn.connect_delay:
                await self._first_server_bytes(conn)
            if self._reply_delay > 0:
                await asyncio.sleep(self._reply_delay)
            if not typed:
                await self._gate(conn)
                writer.write(data)
                await writer.drain()
                continue
            buffer += data
            out = bytearray()
            for kind, message in _split_messages(buffer):
                if conn.cutting:
                    if kind == ord("Z"):  # the statement (and its Sync) is done: cut
                        self._fired += 1
                        conn.cutting = False
                        conn.abort()
                        return
                    continue
                if conn.cut_pending is not None:
                    # CommandComplete, or PortalSuspended after a row-limited Execute
                    # (asyncpg's fetchrow/fetchval): the statement has run.
                    if kind in (ord("C"), ord("s")):
                        conn.cut_pending = None
                        conn.cutting = True
                        continue
                    if kind == ord("Z"):  # it failed (or ran nothing): no cut, still armed
                        self._give_back(conn.cut_pending)
                        conn.cut_pending = None
                out += message
            if out:
                await self._gate(conn)
                writer.write(out)
                await writer.drain()
