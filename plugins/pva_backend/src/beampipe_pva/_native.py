"""The I/O half of the native read path: circuits, channels and GETs that are INITed once.

p4p makes every read a new GET operation (INIT with a type exchange, EXEC,
blocking close).  pvAccess lets a client keep the operation and EXEC it again;
p4p 4.3 does not expose that, so this module does it over plain sockets with
:mod:`._codec`: one TCP circuit per server, two persistent GETs per channel
(the whole PV, and ``field(value)`` for callers that want only the value),
every EXEC of a batch written with one ``send``, replies parsed as they
arrive on one thread.  Each EXEC makes the server read the PV then and
there, so every read is still a fresh GET issued after the caller asked.
The thread lives while a circuit is open: it echoes every 15 s (pvxs servers
drop silent clients) and closes circuits no read has used for 60 s.

It only serves what it can do well.  :meth:`NativeReader.start_reads` takes
the names whose channel is connected with a decodable type and hands back
the rest, which the caller reads through p4p (and :meth:`NativeReader.want`
starts connecting them natively in the background for next time).  Types
the codec does not parse (NTNDArray, unions), servers the search does not
reach (name servers, other networks) and PVs that do not exist stay on p4p,
which already reports them properly.

Delta replies: a server may answer a re-EXECed GET with only the fields that
changed since its last reply on that operation (pvDatabase does: everything
first, then what changed, an empty bitset if nothing did).  Each GET keeps
its fields as of its last reply and merges every reply into them; a read is
answered from the merged copy, never from defaults.

Faults: a lost circuit fails its reads in flight (None with the reason) and
puts its channels back to searching; a reconnect INITs again, so a PV whose
type changed across a server restart is parsed with its new type.  A server
whose circuits keep failing (refused, malformed messages) is held off with a
growing delay, and after a few failures its channels are marked ``failed``
(p4p serves them); names the search does not find are searched again only
after a growing hold-off, so PVs behind a gateway or name server do not cost
a search per batch.  An unexpected error on the I/O thread fails every read
in flight with the reason and leaves the reader able to start again.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import logging
import os
import selectors
import socket
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from . import _codec as C

__all__ = ["OP_VALUE", "OP_WHOLE", "Answer", "NativeReader", "ReadCallback", "search_addresses"]

logger = logging.getLogger("beampipe.pva.native")

#: One answered read: (name, type, fields, None), or (name, None, None, error).
Answer = tuple[str, "C.FieldDesc | None", "dict[str, Any] | None", "str | None"]
#: Called with the answers to one caller's reads, several at a time (all that one pass of the
#: I/O thread parsed), so the caller takes its own locks once per pass, not once per read.
ReadCallback = Callable[[list[Answer]], None]

_SEARCH_BACKOFF = (0.0, 0.03, 0.1, 0.25, 0.5, 1.0, 2.0)
_IDLE_EXIT = 0.5  # the I/O thread exits after this long with nothing to do (and no circuit)
#: pvxs servers close a client circuit that has been silent for ~40 s: echo well before that.
_ECHO_EVERY = 15.0
#: A circuit no read has used for this long is closed (its PVs go back to p4p until read again).
_CIRCUIT_IDLE = 60.0
_STUCK = 5.0  # an EXEC unanswered this long marks its channel as broken
#: A server whose circuit failed (refused, lost before serving a read, malformed messages) is
#: not connected to again for _SERVER_HOLD[min(failures - 1, len - 1)] s; after _SERVER_GIVE_UP
#: failures in a row the channels that found it are marked failed (p4p serves them).
_SERVER_HOLD = (0.05, 0.5, 2.0, 5.0, 15.0, 30.0)
_SERVER_GIVE_UP = 4
#: A failed name (not found, or its server given up on) is searched again on want() only after
#: _FAILED_HOLD[min(rounds, len - 1)] s: p4p serves it meanwhile.
_FAILED_HOLD = (10.0, 30.0, 120.0, 600.0)


def search_addresses(environ: dict[str, str] | None = None) -> list[tuple[str, int]]:
    """Where to send searches, from EPICS_PVA_ADDR_LIST / _AUTO_ADDR_LIST / _BROADCAST_PORT."""
    env = os.environ if environ is None else environ
    port = int(env.get("EPICS_PVA_BROADCAST_PORT", "5076") or 5076)
    out: list[tuple[str, int]] = []
    for item in env.get("EPICS_PVA_ADDR_LIST", "").split():
        host, _, p = item.partition(":")
        try:
            out.append((socket.gethostbyname(host), int(p) if p else port))
        except (OSError, ValueError):
            logger.warning("EPICS_PVA_ADDR_LIST entry %r ignored", item)
    if env.get("EPICS_PVA_AUTO_ADDR_LIST", "YES").strip().upper() != "NO":
        out.append(("255.255.255.255", port))
    return list(dict.fromkeys(out))


#: The GET operations each channel keeps: the whole PV (p4p Values for ophyd and ophyd-async)
#: and only its ``value`` (what ``bulk_get`` returns: the server fills and sends less).
OP_WHOLE = "whole"
OP_VALUE = "value"
_OP_FIELDS = {OP_WHOLE: (), OP_VALUE: ("value",)}
#: The fields each GET parses (the value-only one skips anything else a server sends).
_OP_KEEP: dict[str, frozenset[str] | None] = {OP_WHOLE: None, OP_VALUE: frozenset(("value",))}


class _Op:
    """One persistent GET of a channel, INITed once and EXECed per read."""

    __slots__ = (
        "base_bits",
        "busy",
        "channel",
        "desc",
        "exec_msg",
        "execs",
        "ioid",
        "keep",
        "kind",
        "last",
        "queue",
        "sent_at",
        "state",
    )

    def __init__(self, channel: _Channel, kind: str, ioid: int) -> None:
        self.channel = channel
        self.kind = kind
        self.ioid = ioid
        self.keep = _OP_KEEP[kind]
        #: the fields as of the last reply (delta replies are merged in), and the bitset of
        #: the reply that set its shape (a reply with the same bitset replaces it whole);
        #: None once a merge added fields, until the next complete reply
        self.last: dict[str, Any] | None = None
        self.base_bits: bytes | None = None
        self.state = "init"  # -> ready, or failed (the server refused it / a type we cannot parse)
        self.desc: C.FieldDesc | None = None
        self.exec_msg = b""
        #: reads waiting for this operation's EXEC replies: (callback, fields to decode)
        self.queue: collections.deque[tuple[ReadCallback, frozenset[str] | None]] = (
            collections.deque()
        )
        self.busy = False
        self.sent_at = 0.0
        self.execs = 0


class _Channel:
    __slots__ = (
        "attempts",
        "cid",
        "circuit",
        "failed_rounds",
        "hold_until",
        "name",
        "next_search",
        "ops",
        "sid",
        "state",
    )

    # states: search -> connect (circuit) -> create -> init -> ready; failed; unsupported
    def __init__(self, name: str, cid: int) -> None:
        self.name = name
        self.cid = cid
        self.state = "search"
        self.attempts = 0
        self.next_search = 0.0
        #: times it ended failed, and until when want() leaves it failed (on p4p)
        self.failed_rounds = 0
        self.hold_until = 0.0
        self.circuit: _Circuit | None = None
        self.sid = -1
        self.ops: dict[str, _Op] = {}


class _Circuit:
    __slots__ = (
        "addr",
        "by_cid",
        "by_ioid",
        "framer",
        "good",
        "last_tx",
        "last_used",
        "sock",
        "state",
        "tx",
        "types",
        "waiting",
    )

    def __init__(self, addr: tuple[str, int], sock: socket.socket) -> None:
        self.addr = addr
        self.sock = sock
        self.state = "connecting"  # -> validating -> ready
        self.framer = C.Framer()
        self.tx = bytearray()
        self.types: dict[int, C.FieldDesc] = {}
        self.by_cid: dict[int, _Channel] = {}
        self.by_ioid: dict[int, _Op] = {}
        self.waiting: list[_Channel] = []
        self.last_tx = self.last_used = time.monotonic()
        #: a GET on it was INITed: the server works, so losing it later is not its failure
        self.good = False


class NativeReader:
    """Persistent pvAccess GETs for the channels it can serve; see the module docstring."""

    def __init__(self, addresses: list[tuple[str, int]] | None = None) -> None:
        self._addresses = search_addresses() if addresses is None else addresses
        self._lock = threading.Lock()
        self._service_lock = threading.Lock()
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._udp.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        self._udp.bind(("0.0.0.0", 0))
        self._udp.setblocking(False)
        self._sel.register(self._udp, selectors.EVENT_READ, "udp")
        self._channels: dict[str, _Channel] = {}
        #: channels on their way to ready (search, connect, create, init)
        self._pending: set[_Channel] = set()
        #: channels with an EXEC outstanding
        self._inflight = 0
        self._by_cid: dict[int, _Channel] = {}
        self._circuits: dict[tuple[str, int], _Circuit] = {}
        #: server address -> (circuit failures in a row, no new circuit before this time)
        self._server_fails: dict[tuple[str, int], tuple[int, float]] = {}
        self._stuck_check_at = 0.0
        self._next_id = 1
        self._search_seq = 0
        self._thread: threading.Thread | None = None
        self._closed = False
        #: EXECs written so far (how tests and benchmarks see which path served a read)
        self.execs = 0

    # --- caller side ------------------------------------------------------------------

    def start_reads(
        self,
        names: Iterable[str],
        on_result: ReadCallback,
        keep: frozenset[str] | None = None,
        op: str = OP_WHOLE,
    ) -> list[str]:
        """EXEC the persistent GET of each ready name; returns the names it did not take.

        ``op``: which of the channel's GETs (:data:`OP_WHOLE`, :data:`OP_VALUE`; the whole one
        if the server refused the other); ``keep``: the top-level fields to answer with
        (None: all).
        """
        kind = op
        rest: list[str] = []
        touched: set[_Circuit] = set()
        done: list[tuple[ReadCallback, str, str]] = []
        now = time.monotonic()
        with self._lock:
            if self._closed:
                return list(names)
            for name in names:
                ch = self._channels.get(name)
                if ch is None or ch.state != "ready" or ch.circuit is None:
                    rest.append(name)
                    continue
                get = ch.ops.get(kind)
                if get is None or get.state != "ready":
                    get = ch.ops[OP_WHOLE]
                if get.busy and now - get.sent_at > _STUCK:
                    self._reset_channel(ch, _stuck_reason(name), done)
                    rest.append(name)
                    continue
                get.queue.append((on_result, keep))
                if not get.busy:
                    get.busy = True
                    self._inflight += 1
                    get.sent_at = now
                    ch.circuit.tx += get.exec_msg
                    self.execs += 1
                    get.execs += 1
                    touched.add(ch.circuit)
            for circuit in touched:
                circuit.last_used = now
                self._flush(circuit)
            if touched or done or (self._thread is None and self._pending):
                self._ensure_thread()
        _deliver([], done)
        return rest

    def want(self, names: Iterable[str]) -> None:
        """Start connecting these names natively (search, channel, GET INIT) in the background."""
        with self._lock:
            if self._closed:
                return
            new = False
            for name in names:
                ch = self._channels.get(name)
                if ch is None:
                    ch = _Channel(name, self._new_id())
                    self._channels[name] = ch
                    self._by_cid[ch.cid] = ch
                    new = True
                    self._set_state(ch, "search")
                elif ch.state == "failed" and time.monotonic() >= ch.hold_until:
                    self._set_state(ch, "search")
                    ch.attempts, ch.next_search = 0, 0.0
                    new = True
            if new or (self._thread is None and self._pending):
                self._ensure_thread()

    def state(self, name: str) -> str:
        """The channel's native state (``ready``, ``search``, ``unsupported``, ...); for tests."""
        with self._lock:
            ch = self._channels.get(name)
            return "absent" if ch is None else ch.state

    def close(self) -> None:
        """Close every circuit, fail reads in flight, stop the I/O thread."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            thread = self._thread
        self._wake()
        if thread is not None and thread is not threading.current_thread():
            thread.join(5.0)
        done: list[tuple[ReadCallback, str, str]] = []
        with self._lock:
            for circuit in list(self._circuits.values()):
                self._drop_circuit(circuit, "client closed", done)
            self._sel.close()
            self._udp.close()
            self._wake_r.close()
            self._wake_w.close()
        _deliver([], done)

    # --- the I/O thread ---------------------------------------------------------------

    def _ensure_thread(self) -> None:
        """With the lock held."""
        if self._thread is None and not self._closed:
            self._thread = threading.Thread(target=self._run, name="beampipe-pva-net", daemon=True)
            self._thread.start()
        else:
            self._wake()

    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            self._wake_w.send(b"\0")

    def _run(self) -> None:
        try:
            self._loop()
        except Exception as exc:
            # A bug, or a fault nothing above expected: no read may wait for an answer this
            # thread will never parse, and the next read must find a reader that works.
            logger.exception("pvAccess native reader: I/O thread failed")
            self._recover(f"native reader failed: {type(exc).__name__}: {exc}")
        finally:
            with self._lock:
                if self._thread is threading.current_thread():
                    self._thread = None

    def _loop(self) -> None:
        idle_since = time.monotonic()
        while True:
            with self._service_lock:
                if self._closed:
                    return
                self._service(self._next_timer())
            now = time.monotonic()
            with self._lock:
                if self._closed:
                    return
                if self._busy():
                    idle_since = now
                elif now - idle_since >= _IDLE_EXIT:
                    self._thread = None
                    return

    def _recover(self, reason: str) -> None:
        """After an unexpected error: fail reads in flight, close circuits, search again."""
        done: list[tuple[ReadCallback, str, str]] = []
        try:
            with self._lock:
                if self._closed:
                    return
                for circuit in list(self._circuits.values()):
                    self._drop_circuit(circuit, reason, done, restart=False)
                for ch in self._channels.values():
                    self._fail_reads(ch, f"{ch.name}: {reason}", done)
                # this thread is finished: a want() or read from now on starts a new one
                # instead of waking this one, and searches already pending get one now
                if self._thread is threading.current_thread():
                    self._thread = None
                if self._pending:
                    self._ensure_thread()
        finally:
            _deliver([], done)

    def _busy(self) -> bool:
        """With the lock held: anything the thread must still watch or do (an open circuit
        needs its echoes, and its EOF noticed)."""
        return bool(self._pending or self._inflight or self._circuits)

    def _next_timer(self) -> float:
        with self._lock:
            nxt = min(
                (ch.next_search for ch in self._pending if ch.state == "search"),
                default=None,
            )
        tick = min(_IDLE_EXIT, _ECHO_EVERY, _CIRCUIT_IDLE) / 2
        if nxt is None:
            return tick
        return max(0.0, min(tick, nxt - time.monotonic()))

    def _service(self, timeout: float) -> None:
        """One pass: wait for sockets up to ``timeout``, handle what is ready, send searches."""
        events = self._sel.select(timeout)
        done: list[tuple[ReadCallback, str, str]] = []
        results: list[tuple[ReadCallback, Answer]] = []
        try:
            for key, mask in events:
                tag = key.data
                if tag == "wake":
                    with contextlib.suppress(OSError):
                        self._wake_r.recv(4096)
                elif tag == "udp":
                    self._read_udp()
                else:
                    circuit: _Circuit = tag
                    if mask & selectors.EVENT_WRITE:
                        with self._lock:
                            self._writable(circuit, done)
                    if mask & selectors.EVENT_READ:
                        self._readable(circuit, done, results)
            now = time.monotonic()
            self._send_searches(now)
            with self._lock:
                self._keepalive(now, done)
        finally:  # what was parsed or failed is delivered even if a later step raised
            _deliver(results, done)

    def _keepalive(self, now: float, done: list[tuple[ReadCallback, str, str]]) -> None:
        """With the lock held: echo on quiet circuits, close the ones no read uses any more,
        reset channels whose GET the server has left unanswered."""
        # Looking for stuck GETs walks every operation: not on every pass (a batch's replies
        # come in several), a few times per _STUCK.
        check_stuck = now >= self._stuck_check_at
        if check_stuck:
            self._stuck_check_at = now + _STUCK / 4
        for circuit in list(self._circuits.values()):
            if circuit.state != "ready":
                continue
            if check_stuck:
                stuck = {
                    op.channel
                    for op in circuit.by_ioid.values()
                    if op.busy and now - op.sent_at > _STUCK
                }
                for ch in stuck:
                    self._reset_channel(ch, _stuck_reason(ch.name), done)
            idle = not any(op.busy for op in circuit.by_ioid.values())
            if idle and now - circuit.last_used > _CIRCUIT_IDLE:
                channels = list(circuit.by_cid.values())
                self._drop_circuit(circuit, "closed after idling", done, idle=True)
                for ch in channels:
                    self._forget(ch)
            elif now - circuit.last_tx > _ECHO_EVERY:
                circuit.tx += C.message(C.CMD_ECHO, b"")
                self._flush(circuit)

    def _forget(self, ch: _Channel) -> None:
        """With the lock held: drop the channel as if never asked for (no reads pending)."""
        self._detach(ch, "absent")
        self._channels.pop(ch.name, None)
        self._by_cid.pop(ch.cid, None)

    # --- search -----------------------------------------------------------------------

    def _send_searches(self, now: float) -> None:
        with self._lock:
            due = [ch for ch in self._pending if ch.state == "search" and ch.next_search <= now]
            for ch in due:
                ch.attempts += 1
                if ch.attempts > len(_SEARCH_BACKOFF):
                    self._fail(ch, now)  # p4p serves it; a want() after the hold-off searches
                    continue
                ch.next_search = now + _SEARCH_BACKOFF[min(ch.attempts, len(_SEARCH_BACKOFF) - 1)]
            due = [ch for ch in due if ch.state == "search"]
            if not due:
                return
            self._search_seq += 1
            seq = self._search_seq
        port = self._udp.getsockname()[1]
        batch: list[tuple[int, str]] = []
        size = 0
        for ch in due:
            batch.append((ch.cid, ch.name))
            size += len(ch.name) + 6
            if size > 1200:
                self._send_search(seq, batch, port)
                batch, size = [], 0
        if batch:
            self._send_search(seq, batch, port)

    def _send_search(self, seq: int, batch: list[tuple[int, str]], port: int) -> None:
        data = C.search_request(seq, batch, port)
        for addr in self._addresses:
            try:
                self._udp.sendto(data, addr)
            except OSError as exc:
                logger.debug("search to %s:%d failed: %s", *addr, exc)

    def _read_udp(self) -> None:
        while True:
            try:
                data, src = self._udp.recvfrom(65536)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            reply = C.parse_search_response(data, src[0])
            if reply is None or not reply.found:
                continue
            with self._lock:
                for cid in reply.cids:
                    ch = self._by_cid.get(cid)
                    if ch is None or ch.state not in ("search", "failed"):
                        continue
                    self._attach(ch, (reply.host, reply.port))

    # --- circuits ---------------------------------------------------------------------

    def _attach(self, ch: _Channel, addr: tuple[str, int]) -> None:
        """With the lock held: put the channel on the circuit to ``addr`` (opening it)."""
        circuit = self._circuits.get(addr)
        if circuit is None:
            fails, until = self._server_fails.get(addr, (0, 0.0))
            now = time.monotonic()
            if now < until:  # held off after a failure
                if fails < _SERVER_GIVE_UP:
                    ch.next_search = max(ch.next_search, until)  # search again when it ends
                elif ch.state != "failed":
                    self._fail(ch, now)  # given up on (for now): p4p serves it
                return
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            err = sock.connect_ex(addr)
            if err not in (0, errno.EINPROGRESS, errno.EWOULDBLOCK):
                sock.close()
                logger.debug("connect to %s:%d failed: %s", *addr, os.strerror(err))
                self._server_failed(addr)
                return
            circuit = _Circuit(addr, sock)
            self._circuits[addr] = circuit
            self._sel.register(sock, selectors.EVENT_WRITE | selectors.EVENT_READ, circuit)
        ch.circuit = circuit
        circuit.by_cid[ch.cid] = ch
        if circuit.state == "ready":
            self._create(ch)
        else:
            self._set_state(ch, "connect")
            circuit.waiting.append(ch)

    def _create(self, ch: _Channel) -> None:
        assert ch.circuit is not None
        self._set_state(ch, "create")
        ch.circuit.tx += C.create_channel(ch.cid, ch.name)
        self._flush(ch.circuit)

    def _flush(self, circuit: _Circuit) -> None:
        """With the lock held: send what the circuit has queued, or leave it for the thread."""
        if not circuit.tx or circuit.state == "connecting":
            return
        try:
            sent = circuit.sock.send(circuit.tx)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            return  # the read side sees the error and drops the circuit
        del circuit.tx[:sent]
        circuit.last_tx = time.monotonic()
        if circuit.tx:
            self._sel.modify(circuit.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, circuit)
            self._wake()

    def _writable(self, circuit: _Circuit, done: list[tuple[ReadCallback, str, str]]) -> None:
        if circuit.state == "connecting":
            err = circuit.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                self._drop_circuit(circuit, f"connect failed: {os.strerror(err)}", done)
                return
            circuit.state = "validating"
        if circuit.tx:
            self._flush(circuit)
        if not circuit.tx:
            self._sel.modify(circuit.sock, selectors.EVENT_READ, circuit)

    def _readable(
        self,
        circuit: _Circuit,
        done: list[tuple[ReadCallback, str, str]],
        results: list[tuple[ReadCallback, Answer]],
    ) -> None:
        try:
            data = circuit.sock.recv(1 << 20)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            with self._lock:
                self._drop_circuit(circuit, f"connection lost: {exc}", done)
            return
        with self._lock:
            if not data:
                self._drop_circuit(circuit, "connection lost (server closed it)", done)
                return
            try:
                for msg in circuit.framer.feed(data):
                    self._handle(circuit, msg, done, results)
            except C.ProtocolError as exc:
                logger.warning("pvAccess circuit to %s:%d: %s", *circuit.addr, exc)
                self._drop_circuit(circuit, f"protocol error: {exc}", done, fault=True)

    def _handle(
        self,
        circuit: _Circuit,
        msg: C.Message,
        done: list[tuple[ReadCallback, str, str]],
        results: list[tuple[ReadCallback, Answer]],
    ) -> None:
        cmd, body, order = msg.command, msg.body, msg.order
        if cmd == C.CMD_GET:
            get = circuit.by_ioid.get(C.parse_ioid(body, order))
            if get is None:
                return
            ch = get.channel
            desc = get.desc
            try:
                reply = C.parse_get_reply(body, order, circuit.types, lambda _: desc, get.keep)
            except C.ProtocolError as exc:  # one bad reply: this channel starts over
                self._reset_channel(ch, f"{ch.name}: bad GET reply: {exc}", done)
                return
            if reply.init:
                self._on_init(get, reply)
                if not circuit.good and get.state == "ready":
                    circuit.good = True  # the server serves: its earlier strikes are spent
                    self._server_fails.pop(circuit.addr, None)
            elif reply.error is not None:
                self._answer(get, done, reply.error)
            else:
                assert reply.value is not None and desc is not None
                fields = self._merge(get, reply)
                head = get.queue.popleft() if get.queue else None
                self._next_exec(get)
                if head is None:
                    return
                name = ch.name
                keep = head[1]
                if keep is not None and keep != get.keep:
                    fields = {k: v for k, v in fields.items() if k in keep}
                results.append((head[0], (name, desc, fields, None)))
        elif cmd == C.CMD_VALIDATION:
            _, methods = C.parse_validation(body, order)
            circuit.tx += C.client_validation(methods, *_identity())
            self._flush(circuit)
        elif cmd == C.CMD_CONNECTION_VALIDATED:
            error = C.parse_connection_validated(body, order)
            if error is not None:
                self._drop_circuit(circuit, f"server refused the connection: {error}", done)
                return
            circuit.state = "ready"
            waiting, circuit.waiting = circuit.waiting, []
            for ch in waiting:
                if ch.circuit is circuit and ch.state == "connect":
                    self._create(ch)
        elif cmd == C.CMD_CREATE_CHANNEL:
            cid, sid, error = C.parse_create_channel_reply(body, order)
            chan = circuit.by_cid.get(cid)
            if chan is None or chan.state != "create":
                return
            if error is not None:
                logger.debug("pva://%s: create channel refused: %s", chan.name, error)
                self._detach(chan, "failed")
                self._fail(chan, time.monotonic())
                return
            chan.sid = sid
            self._set_state(chan, "init")
            for op_kind, request in _OP_FIELDS.items():
                new = _Op(chan, op_kind, self._new_id())
                chan.ops[op_kind] = new
                circuit.by_ioid[new.ioid] = new
                circuit.tx += C.get_init(sid, new.ioid, request)
            self._flush(circuit)
        elif cmd == C.CMD_DESTROY_CHANNEL:
            _sid, cid = C.parse_destroy_channel(body, order)
            gone = circuit.by_cid.get(cid)
            if gone is not None:
                self._reset_channel(gone, f"{gone.name}: the server destroyed the channel", done)
        elif cmd == C.CMD_MESSAGE:
            ioid, severity, text = C.parse_message(body, order)
            about = circuit.by_ioid.get(ioid)
            name = about.channel.name if about is not None else "?"
            logger.debug("server message for pva://%s: [%d] %s", name, severity, text)

    @staticmethod
    def _merge(get: _Op, reply: C.GetReply) -> dict[str, Any]:
        """The GET's fields after this reply: the first reply after INIT as it is (fields it
        left unmarked were never set: a p4p Value shows their defaults, as p4p's own GET
        does), later ones merged into the previous copy.

        A field the server did not resend is one it says has not changed since its last
        reply on this operation, and this EXEC made it read the PV again: so the merged copy
        is the PV as of this EXEC, as fresh as the fields it did send (what p4p and pvxs
        clients do with monitor updates, which carry the same kind of bitset).
        """
        value = reply.value
        assert value is not None
        last = get.last
        if last is None or reply.complete:
            get.last, get.base_bits = value, reply.bits
        elif reply.bits == get.base_bits:  # the same fields as the copy has: nothing to keep
            get.last = value
        else:
            get.last = _merged(last, value)
            get.base_bits = None  # the copy now holds more than any one bitset says
        return get.last

    def _on_init(self, get: _Op, reply: C.GetReply) -> None:
        ch = get.channel
        if reply.error is not None or reply.desc is None or not reply.desc.supported():
            # Refused, or a type the codec does not parse (NTNDArray...): p4p reads it.
            logger.debug("pva://%s: %s GET not native: %s", ch.name, get.kind, reply.error)
            if get.kind == OP_WHOLE:
                self._detach(ch, "unsupported")
                return
            get.state = "failed"  # value-only refused (no 'value' field): the whole GET serves
        else:
            get.desc = reply.desc
            get.exec_msg = C.get_exec(ch.sid, get.ioid)
            get.last = None  # a new INIT: the next reply is the whole value again
            get.state = "ready"
        if ch.state == "init" and all(g.state != "init" for g in ch.ops.values()):
            self._set_state(ch, "ready")
            ch.failed_rounds = 0  # served: a later failure starts the hold-offs from the start

    def _answer(self, get: _Op, done: list[tuple[ReadCallback, str, str]], error: str) -> None:
        head = get.queue.popleft() if get.queue else None
        self._next_exec(get)
        if head is not None:
            name = get.channel.name
            done.append((head[0], name, f"{name}: server error: {error}"))

    def _next_exec(self, get: _Op) -> None:
        ch = get.channel
        if get.queue and ch.circuit is not None and ch.state == "ready":
            get.sent_at = time.monotonic()
            ch.circuit.tx += get.exec_msg
            self.execs += 1
            get.execs += 1
            self._flush(ch.circuit)
        elif get.busy:
            get.busy = False
            self._inflight -= 1

    def _fail_reads(
        self, ch: _Channel, reason: str, done: list[tuple[ReadCallback, str, str]]
    ) -> None:
        for get in ch.ops.values():
            while get.queue:
                done.append((get.queue.popleft()[0], ch.name, reason))
            if get.busy:
                get.busy = False
                self._inflight -= 1

    def _detach(self, ch: _Channel, state: str) -> None:
        """With the lock held: take the channel off its circuit (telling the server)."""
        circuit = ch.circuit
        if circuit is not None:
            circuit.by_cid.pop(ch.cid, None)
            for get in ch.ops.values():
                circuit.by_ioid.pop(get.ioid, None)
            if ch.sid >= 0 and circuit.state == "ready":
                circuit.tx += C.destroy_channel(ch.sid, ch.cid)
                self._flush(circuit)
        ch.circuit, ch.sid, ch.ops = None, -1, {}
        self._set_state(ch, state)

    def _reset_channel(
        self, ch: _Channel, reason: str, done: list[tuple[ReadCallback, str, str]]
    ) -> None:
        """With the lock held: fail its reads, forget its server, search for it again."""
        self._fail_reads(ch, reason, done)
        self._detach(ch, "search")
        ch.attempts, ch.next_search = 0, 0.0

    def _drop_circuit(
        self,
        circuit: _Circuit,
        reason: str,
        done: list[tuple[ReadCallback, str, str]],
        *,
        restart: bool = True,
        fault: bool = False,
        idle: bool = False,
    ) -> None:
        """With the lock held: close it; its reads fail, its channels search again (after a
        hold-off if the server failed: before serving anything, or with a ``fault``)."""
        if self._circuits.get(circuit.addr) is circuit:
            del self._circuits[circuit.addr]
        delay, give_up = 0.05, False
        if self._closed or idle or (circuit.good and not fault):  # (idle: not a strike)
            self._server_fails.pop(circuit.addr, None)
        else:
            delay = self._server_failed(circuit.addr)
            give_up = self._server_fails[circuit.addr][0] >= _SERVER_GIVE_UP
        with contextlib.suppress(KeyError, ValueError):
            self._sel.unregister(circuit.sock)
        circuit.sock.close()
        circuit.state = "closed"
        host, port = circuit.addr
        for ch in list(circuit.by_cid.values()) + circuit.waiting:
            if ch.circuit is circuit:
                ch.circuit = None
                self._fail_reads(ch, f"{ch.name}: {reason} ({host}:{port})", done)
                ch.sid, ch.ops = -1, {}
                if give_up:
                    self._fail(ch, time.monotonic())
                elif ch.state != "unsupported":
                    self._set_state(ch, "search")
                    ch.attempts, ch.next_search = 0, time.monotonic() + delay
        circuit.by_cid.clear()
        circuit.by_ioid.clear()
        circuit.waiting.clear()
        if restart and not self._closed:
            self._ensure_thread()

    def _server_failed(self, addr: tuple[str, int]) -> float:
        """With the lock held: count a circuit failure of this server; the hold-off it gets."""
        fails = self._server_fails.get(addr, (0, 0.0))[0] + 1
        delay = _SERVER_HOLD[min(fails - 1, len(_SERVER_HOLD) - 1)]
        self._server_fails[addr] = (fails, time.monotonic() + delay)
        if fails >= _SERVER_GIVE_UP:
            logger.warning(
                "pvAccess server %s:%d failed %d times in a row: its PVs are read through p4p",
                *addr,
                fails,
            )
        return delay

    def _fail(self, ch: _Channel, now: float) -> None:
        """With the lock held: leave it to p4p; want() searches again after a growing hold-off."""
        self._set_state(ch, "failed")
        ch.hold_until = now + _FAILED_HOLD[min(ch.failed_rounds, len(_FAILED_HOLD) - 1)]
        ch.failed_rounds += 1

    _PENDING = frozenset(("search", "connect", "create", "init"))

    def _set_state(self, ch: _Channel, state: str) -> None:
        """With the lock held."""
        ch.state = state
        if state in self._PENDING:
            self._pending.add(ch)
        else:
            self._pending.discard(ch)

    def _new_id(self) -> int:
        self._next_id = (self._next_id + 1) & 0x7FFFFFFF or 1
        return self._next_id


def _identity() -> tuple[str, str]:
    """(user, host) for ``ca`` authentication, as p4p/pvxs would send them."""
    import getpass

    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = ""
    return user, socket.gethostname()


def _stuck_reason(name: str) -> str:
    return f"{name}: GET unanswered for {_STUCK:g} s (the channel is reset)"


def _merged(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """``old`` with the fields of ``new`` (a delta) put in, as a new dict (old is not changed).

    Values carried over are shared with the previous answer: no caller changes an answer
    (p4p Values are built from it, decoded arrays and tables are copied out, see _wire).
    """
    out = dict(old)
    for key, now in new.items():
        was = old.get(key)
        out[key] = _merged(was, now) if isinstance(was, dict) and isinstance(now, dict) else now
    return out


def _deliver(
    results: list[tuple[ReadCallback, Answer]], done: list[tuple[ReadCallback, str, str]]
) -> None:
    """Hand answers and failures to their callbacks, grouped so each runs once per pass."""
    groups: dict[int, tuple[ReadCallback, list[Answer]]] = {}
    for cb, answer in results:
        groups.setdefault(id(cb), (cb, []))[1].append(answer)
    for cb, name, reason in done:
        groups.setdefault(id(cb), (cb, []))[1].append((name, None, None, reason))
    for cb, answers in groups.values():
        try:
            cb(answers)
        except Exception:
            logger.exception("read callback for %d PVs failed", len(answers))
