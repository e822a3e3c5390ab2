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

Faults: a lost circuit fails its reads in flight (None with the reason) and
puts its channels back to searching; a reconnect INITs again, so a PV whose
type changed across a server restart is parsed with its new type.
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


class _Op:
    """One persistent GET of a channel, INITed once and EXECed per read."""

    __slots__ = (
        "busy",
        "channel",
        "desc",
        "exec_msg",
        "execs",
        "ioid",
        "kind",
        "queue",
        "sent_at",
        "state",
    )

    def __init__(self, channel: _Channel, kind: str, ioid: int) -> None:
        self.channel = channel
        self.kind = kind
        self.ioid = ioid
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
    __slots__ = ("attempts", "cid", "circuit", "name", "next_search", "ops", "sid", "state")

    # states: search -> connect (circuit) -> create -> init -> ready; failed; unsupported
    def __init__(self, name: str, cid: int) -> None:
        self.name = name
        self.cid = cid
        self.state = "search"
        self.attempts = 0
        self.next_search = 0.0
        self.circuit: _Circuit | None = None
        self.sid = -1
        self.ops: dict[str, _Op] = {}


class _Circuit:
    __slots__ = (
        "addr",
        "by_cid",
        "by_ioid",
        "framer",
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
        if the server refused the other); ``keep``: the top-level fields to decode (None: all).
        """
        kind = op
        if self._thread is None:
            self._poll_inline()
        rest: list[str] = []
        touched: set[_Circuit] = set()
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
                    self._reset_channel(ch, f"{name}: GET unanswered for {_STUCK:.0f} s", [])
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
            if touched:
                self._ensure_thread()
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
                elif ch.state == "failed":
                    self._set_state(ch, "search")
                    ch.attempts, ch.next_search = 0, 0.0
                    new = True
            if new:
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
        _run(done)

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

    def _poll_inline(self) -> None:
        """With no I/O thread running, notice what happened on idle circuits (EOF, destroys)."""
        if self._service_lock.acquire(blocking=False):
            try:
                if not self._closed:
                    self._service(0.0)
            finally:
                self._service_lock.release()

    def _run(self) -> None:
        idle_since = time.monotonic()
        while True:
            with self._service_lock:
                if self._closed:
                    break
                self._service(self._next_timer())
            now = time.monotonic()
            with self._lock:
                if self._closed:
                    break
                if self._busy():
                    idle_since = now
                elif now - idle_since >= _IDLE_EXIT:
                    self._thread = None
                    return
        with self._lock:
            self._thread = None

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
        results: list[tuple[ReadCallback, str, C.FieldDesc, dict[str, Any]]] = []
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
        groups: dict[int, tuple[ReadCallback, list[Answer]]] = {}
        for cb, name, desc, value in results:
            groups.setdefault(id(cb), (cb, []))[1].append((name, desc, value, None))
        for cb, answers in groups.values():
            try:
                cb(answers)
            except Exception:
                logger.exception("read callback for %d PVs failed", len(answers))
        _run(done)

    def _keepalive(self, now: float, done: list[tuple[ReadCallback, str, str]]) -> None:
        """With the lock held: echo on quiet circuits, close the ones no read uses any more."""
        for circuit in list(self._circuits.values()):
            if circuit.state != "ready":
                continue
            idle = not any(op.busy for op in circuit.by_ioid.values())
            if idle and now - circuit.last_used > _CIRCUIT_IDLE:
                channels = list(circuit.by_cid.values())
                self._drop_circuit(circuit, "closed after idling", done)
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
                    self._set_state(ch, "failed")  # p4p serves it; the next want() searches again
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
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            err = sock.connect_ex(addr)
            if err not in (0, errno.EINPROGRESS, errno.EWOULDBLOCK):
                sock.close()
                logger.debug("connect to %s:%d failed: %s", *addr, os.strerror(err))
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
        results: list[tuple[ReadCallback, str, C.FieldDesc, dict[str, Any]]],
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
                self._drop_circuit(circuit, f"protocol error: {exc}", done)

    def _handle(
        self,
        circuit: _Circuit,
        msg: C.Message,
        done: list[tuple[ReadCallback, str, str]],
        results: list[tuple[ReadCallback, str, C.FieldDesc, dict[str, Any]]],
    ) -> None:
        cmd, body, order = msg.command, msg.body, msg.order
        if cmd == C.CMD_GET:
            (ioid,) = C.struct.unpack_from(order + "i", body, 0)
            get = circuit.by_ioid.get(ioid)
            if get is None:
                return
            ch = get.channel
            keep = get.queue[0][1] if get.queue else None
            desc = get.desc
            try:
                reply = C.parse_get_reply(body, order, circuit.types, lambda _: desc, keep)
            except C.ProtocolError as exc:  # one bad reply: this channel starts over
                self._reset_channel(ch, f"{ch.name}: bad GET reply: {exc}", done)
                return
            if reply.init:
                self._on_init(get, reply)
            elif reply.error is not None:
                self._answer(get, done, reply.error)
            else:
                assert reply.value is not None and desc is not None
                head = get.queue.popleft() if get.queue else None
                self._next_exec(get)
                if head is not None:
                    results.append((head[0], ch.name, desc, reply.value))
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
                return
            chan.sid = sid
            self._set_state(chan, "init")
            for op_kind, fields in _OP_FIELDS.items():
                new = _Op(chan, op_kind, self._new_id())
                chan.ops[op_kind] = new
                circuit.by_ioid[new.ioid] = new
                circuit.tx += C.get_init(sid, new.ioid, fields)
            self._flush(circuit)
        elif cmd == C.CMD_DESTROY_CHANNEL:
            _sid, cid = C.struct.unpack_from(order + "ii", body, 0)
            gone = circuit.by_cid.get(cid)
            if gone is not None:
                self._reset_channel(gone, f"{gone.name}: the server destroyed the channel", done)
        elif cmd == C.CMD_MESSAGE:
            ioid, severity, text = C.parse_message(body, order)
            about = circuit.by_ioid.get(ioid)
            name = about.channel.name if about is not None else "?"
            logger.debug("server message for pva://%s: [%d] %s", name, severity, text)

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
            get.state = "ready"
        if ch.state == "init" and all(g.state != "init" for g in ch.ops.values()):
            self._set_state(ch, "ready")

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
        self, circuit: _Circuit, reason: str, done: list[tuple[ReadCallback, str, str]]
    ) -> None:
        """With the lock held: close it; its reads fail, its channels search again."""
        if self._circuits.get(circuit.addr) is circuit:
            del self._circuits[circuit.addr]
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
                if ch.state != "unsupported":
                    self._set_state(ch, "search")
                    ch.attempts, ch.next_search = 0, time.monotonic() + 0.05
        circuit.by_cid.clear()
        circuit.by_ioid.clear()
        circuit.waiting.clear()
        if not self._closed:
            self._ensure_thread()

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


def _run(done: list[tuple[ReadCallback, str, str]]) -> None:
    """Deliver failed reads, grouped by callback like the answered ones."""
    groups: dict[int, tuple[ReadCallback, list[Answer]]] = {}
    for cb, name, reason in done:
        groups.setdefault(id(cb), (cb, []))[1].append((name, None, None, reason))
    for cb, answers in groups.values():
        try:
            cb(answers)
        except Exception:
            logger.exception("read callback for %d PVs failed", len(answers))
