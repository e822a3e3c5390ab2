"""The native read path (persistent GETs) on real servers, and its faults.

The first read of a PV goes through p4p while the native reader connects it;
from then on reads are EXECs of one persistent GET.  These tests wait for
that switch, then check the values against p4p's own reads of the same PV.
"""

from __future__ import annotations

import contextlib
import logging
import select
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
from p4p.client.thread import Context
from p4p.nt import NTScalar
from p4p.server import Server
from p4p.server.raw import SharedPV

import beampipe_pva
from beampipe_pva import _codec as C
from beampipe_pva import _native
from beampipe_pva._native import NativeReader

from .conftest import IMAGE, PvaServer

QSRV_RECORDS = ("ao", "long", "str", "enum", "wf", "alarmed")


def wait_native(
    names: list[str],
    states: tuple[str, ...] = ("ready",),
    timeout: float = 5.0,
    read_timeout: float = 1.0,
):
    """Read until the native path has taken these PVs (it does from a PV's second read)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        beampipe_pva.bulk_get_raw(names, timeout=read_timeout)
        if all(beampipe_pva.native_state(n) in states for n in names):
            return
        time.sleep(0.02)
    got = {n: beampipe_pva.native_state(n) for n in names}
    raise AssertionError(f"native path not {states} in {timeout} s: {got}")


def _native_on(server: Any, name: str, monkeypatch: Any) -> None:
    """A fresh context whose native search finds only this scripted server, read until the
    native path has ``name`` (p4p does not find the server: its reads fail fast, 0.2 s)."""
    beampipe_pva.close_context()
    monkeypatch.setattr(_native, "search_addresses", lambda *a: [server.search_address])
    wait_native([name], timeout=10, read_timeout=0.2)


def execs() -> int:
    io = beampipe_pva._wire._io
    return 0 if io is None else io.native_execs


def test_qsrv_reads_go_native_and_match_p4p(ioc) -> None:
    names = [ioc.pv(r) for r in QSRV_RECORDS]
    first = beampipe_pva.bulk_get(names)  # through p4p
    # read once: no native channel (not even a native reader yet)
    assert {beampipe_pva.native_state(n) for n in names} <= {"off", "absent"}
    wait_native(names)
    before = execs()
    values = beampipe_pva.bulk_get(names)
    assert execs() == before + len(names)
    np.testing.assert_equal(values, first)
    assert values[ioc.pv("enum")] == "On" and values[ioc.pv("str")] == "hello"
    raw = beampipe_pva.bulk_get_raw(names)
    assert execs() == before + 2 * len(names)
    with Context("pva", nt=False) as ctx:
        theirs = dict(zip(names, ctx.get(names), strict=True))
    for name in names:
        ours = raw[name].value  # type: ignore[union-attr]
        assert ours.getID() == theirs[name].getID()
        assert repr(ours.type()) == repr(theirs[name].type()), name
        np.testing.assert_equal(ours.todict(), theirs[name].todict())


def native_ops(name: str) -> dict[str, Any]:
    """The native channel's GET operations, by kind (whole PV / value only)."""
    reader = beampipe_pva._wire._io._native  # type: ignore[union-attr]
    return dict(reader._channels[name].ops)


def test_bulk_get_asks_the_server_for_value_only(ioc) -> None:
    name = ioc.pv("ao")
    wait_native([name])
    assert native_ops(name)["value"].state == "ready"
    reader = beampipe_pva._wire._io._native  # type: ignore[union-attr]
    for op, sent in (("value", {"value"}), ("whole", {"value", "alarm", "display", "control"})):
        got: list[dict[str, Any]] = []
        done = threading.Event()

        def cb(answers: list[Any], got: Any = got, done: Any = done) -> None:
            got.extend(fields for _n, _d, fields, _e in answers)
            done.set()

        assert reader.start_reads([name], cb, None, op) == []
        assert done.wait(5)
        assert sent <= set(got[0]) and (op == "whole" or set(got[0]) == sent), (op, got)
    ops = native_ops(name)
    value_execs, whole_execs = ops["value"].execs, ops["whole"].execs
    assert beampipe_pva.bulk_get([name]) == {name: 1.5}
    assert (ops["value"].execs, ops["whole"].execs) == (value_execs + 1, whole_execs)
    assert beampipe_pva.bulk_get_raw([name])[name].value["display.units"] == "mm"  # type: ignore
    assert (ops["value"].execs, ops["whole"].execs) == (value_execs + 1, whole_execs + 1)


def test_pv_without_value_field_is_read_through_its_whole_get() -> None:
    from p4p import Type, Value

    name = f"BPPLAIN{time.monotonic_ns() % 10**9}:s"
    plain = Value(Type([("x", "d"), ("label", "s")]), {"x": 4.0, "label": "four"})
    server = Server(providers=[{name: SharedPV(initial=plain)}])
    try:
        wait_native([name])
        assert native_ops(name)["value"].state == "failed"  # the server refused field(value)
        before = execs()
        assert beampipe_pva.bulk_get([name]) == {name: None}  # no value to decode (logged)
        raw = beampipe_pva.bulk_get_raw([name])[name]
        assert execs() == before + 2
        assert raw.value.todict() == {"x": 4.0, "label": "four"}  # type: ignore[union-attr]
    finally:
        server.stop()


def test_p4p_server_types_native_and_ndarray_through_p4p(pva_server: PvaServer) -> None:
    p = pva_server.pv
    names = [p("table"), p("enum"), p("scalar"), p("image")]
    beampipe_pva.bulk_get(names)
    wait_native(names[:3])
    wait_native(names[3:], ("unsupported",))  # NTNDArray's union value: p4p reads it
    before = execs()
    values = beampipe_pva.bulk_get(names)
    assert execs() == before + 3
    assert values[p("enum")] == "High"
    assert values[p("scalar")] == pytest.approx(3.25)
    assert list(values[p("table")]["name"]) == ["a", "b", "c"]
    np.testing.assert_array_equal(values[p("table")]["x"], [1.5, 2.5, -3.0])
    np.testing.assert_array_equal(values[p("image")].data, IMAGE)


def test_native_reads_are_fresh_gets(ioc) -> None:
    name = ioc.pv("ao")
    beampipe_pva.bulk_get([name])
    wait_native([name])
    before = execs()
    with Context("pva", nt=False) as ctx:
        for v in (2.0, -4.5, 7.25):
            ctx.put(name, v)
            assert beampipe_pva.bulk_get([name]) == {name: pytest.approx(v)}
    assert execs() == before + 3


def test_bad_enum_index_fails_natively_with_the_reason(pva_server: PvaServer, caplog) -> None:
    caplog.set_level(logging.WARNING, logger="beampipe.pva")
    name = pva_server.pv("badenum")
    assert beampipe_pva.bulk_get([name]) == {name: None}
    wait_native([name])
    caplog.clear()
    assert beampipe_pva.bulk_get([name]) == {name: None}
    assert any("outside its 2 choices" in r.message and name in r.message for r in caplog.records)


def test_concurrent_readers_of_one_pv_queue_on_its_get(ioc) -> None:
    names = [ioc.pv(r) for r in ("ao", "long")]
    beampipe_pva.bulk_get(names)
    wait_native(names)
    errors: list[BaseException] = []

    def reader() -> None:
        try:
            for _ in range(20):
                assert beampipe_pva.bulk_get(names) == {
                    names[0]: pytest.approx(1.5),
                    names[1]: 42,
                }
        except (AssertionError, OSError) as exc:
            errors.append(exc)

    threads = [threading.Thread(target=reader) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors, errors[0]


def test_unknown_pv_fails_alone_at_its_timeout(ioc, caplog) -> None:
    caplog.set_level(logging.WARNING, logger="beampipe.pva")
    good, bad = ioc.pv("ao"), ioc.pv("nope")
    beampipe_pva.bulk_get([good])
    wait_native([good])
    for _ in range(2):  # the second time the good PV is native, the bad one still p4p
        t0 = time.monotonic()
        assert beampipe_pva.bulk_get([good, bad], timeout=0.5) == {good: 1.5, bad: None}
        assert time.monotonic() - t0 < 1.0
    assert beampipe_pva.native_state(bad) in ("search", "failed")
    assert any(bad in r.message and "no answer" in r.message for r in caplog.records)


def test_ioc_restart_fails_reads_then_reconnects_natively(ioc, caplog) -> None:
    caplog.set_level(logging.WARNING, logger="beampipe.pva")
    name = ioc.pv("ao")
    beampipe_pva.bulk_get([name])
    wait_native([name])
    ioc.stop()
    assert beampipe_pva.bulk_get([name], timeout=0.5) == {name: None}
    assert any(name in r.message for r in caplog.records)
    ioc.start()
    deadline = time.monotonic() + 20
    value = None
    while value is None and time.monotonic() < deadline:
        value = beampipe_pva.bulk_get([name], timeout=2.0)[name]
    assert value == pytest.approx(1.5)
    wait_native([name], timeout=10)
    before = execs()
    assert beampipe_pva.bulk_get([name]) == {name: pytest.approx(1.5)}
    assert execs() == before + 1


def test_type_change_across_a_server_restart_is_read_with_the_new_type() -> None:
    name = f"BPTYPE{time.monotonic_ns() % 10**9}:x"
    server = Server(providers=[{name: SharedPV(initial=NTScalar("d").wrap(2.5))}])
    try:
        assert beampipe_pva.bulk_get([name]) == {name: 2.5}
        wait_native([name])
        assert beampipe_pva.bulk_get([name]) == {name: 2.5}
    finally:
        server.stop()
    server = Server(providers=[{name: SharedPV(initial=NTScalar("s").wrap("now text"))}])
    try:
        deadline = time.monotonic() + 20
        value = None
        while value != "now text" and time.monotonic() < deadline:
            value = beampipe_pva.bulk_get([name], timeout=1.0)[name]
        assert value == "now text"
        wait_native([name], timeout=10)
        before = execs()
        assert beampipe_pva.bulk_get([name]) == {name: "now text"}
        assert execs() == before + 1
    finally:
        server.stop()


def test_native_path_can_be_switched_off(ioc, monkeypatch) -> None:
    beampipe_pva.close_context()
    monkeypatch.setenv("BEAMPIPE_PVA_NATIVE", "0")
    name = ioc.pv("ao")
    for _ in range(3):
        assert beampipe_pva.bulk_get([name]) == {name: 1.5}
    assert beampipe_pva.native_state(name) == "off"


# --- a scripted pvAccess server, to drop a circuit exactly while a read is in flight ------


class ScriptedServer:
    """Answers searches for one PV over UDP and serves it over TCP, one connection at a time.

    ``plan`` gives, per TCP connection, the PV's type and what to do on an EXEC:
    a reply payload (bitset + value), or None to close the connection instead.
    """

    def __init__(self, name: str, plan: list[tuple[bytes, Callable[[], bytes | None]]]) -> None:
        self.name = name
        self.plan = plan
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.udp.bind(("127.0.0.1", 0))
        self.tcp = socket.socket()
        self.tcp.bind(("127.0.0.1", 0))
        self.tcp.listen()
        self.connections = 0
        self.echoes = 0
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="scripted-pva-server")

    @property
    def search_address(self) -> tuple[str, int]:
        return self.udp.getsockname()

    def __enter__(self) -> ScriptedServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop = True
        self._thread.join(5)
        self.udp.close()
        self.tcp.close()

    def _run(self) -> None:
        conn: socket.socket | None = None
        framer = C.Framer()
        desc = b""
        on_exec: Callable[[], bytes | None] = lambda: None  # noqa: E731
        while not self._stop:
            socks: list[Any] = [self.udp, self.tcp] + ([conn] if conn else [])
            ready, _, _ = select.select(socks, [], [], 0.05)
            for sock in ready:
                if sock is self.udp:
                    self._answer_search()
                elif sock is self.tcp:
                    if conn is not None:
                        conn.close()
                    conn, _ = self.tcp.accept()
                    desc, on_exec = self.plan[min(self.connections, len(self.plan) - 1)]
                    self.connections += 1
                    framer = C.Framer()
                    hello = struct.pack("<ih", 1 << 16, 0x7FFF) + b"\x01" + C.encode_string("ca")
                    conn.sendall(C.message(C.CMD_VALIDATION, hello, server=True))
                else:
                    assert conn is not None
                    data = conn.recv(65536)
                    if not data:
                        conn.close()
                        conn = None
                        continue
                    for msg in framer.feed(data):
                        if not self._serve(conn, msg, desc, on_exec):
                            conn.close()
                            conn = None
                            break
        if conn is not None:
            conn.close()

    def _answer_search(self) -> None:
        data, src = self.udp.recvfrom(65536)
        (msg,) = C.Framer().feed(data)
        body = msg.body
        (reply_port,) = struct.unpack_from("<H", body, 24)
        pos = 26
        n = body[pos]
        pos += 1
        for _ in range(n):
            pos += 1 + body[pos]
        (count,) = struct.unpack_from("<H", body, pos)
        pos += 2
        cids = []
        for _ in range(count):
            (cid,) = struct.unpack_from("<I", body, pos)
            k = body[pos + 4]
            if body[pos + 5 : pos + 5 + k].decode() == self.name:
                cids.append(cid)
            pos += 5 + k
        if not cids:
            return
        addr = b"\0" * 10 + b"\xff\xff" + socket.inet_aton("127.0.0.1")
        out = b"G" * 12 + body[:4] + addr + struct.pack("<H", self.tcp.getsockname()[1])
        out += C.encode_string("tcp") + b"\x01" + struct.pack(f"<H{len(cids)}I", len(cids), *cids)
        self.udp.sendto(C.message(C.CMD_SEARCH_RESPONSE, out, server=True), (src[0], reply_port))

    def _serve(
        self, conn: socket.socket, msg: C.Message, desc: bytes, on_exec: Callable[[], bytes | None]
    ) -> bool:
        body = msg.body
        if msg.command == C.CMD_ECHO:
            self.echoes += 1
        elif msg.command == C.CMD_VALIDATION:
            conn.sendall(C.message(C.CMD_CONNECTION_VALIDATED, b"\xff", server=True))
        elif msg.command == C.CMD_CREATE_CHANNEL:
            (cid,) = struct.unpack_from("<i", body, 2)
            reply = struct.pack("<ii", cid, 1000 + cid) + b"\xff"
            conn.sendall(C.message(C.CMD_CREATE_CHANNEL, reply, server=True))
        elif msg.command == C.CMD_GET:
            _sid, ioid, sub = struct.unpack_from("<iiB", body, 0)
            if sub & C.SUB_INIT:
                reply = struct.pack("<iB", ioid, sub) + b"\xff" + desc
            else:
                payload = on_exec()
                if payload is None:
                    return False  # the server "crashes" with this read in flight
                reply = struct.pack("<iB", ioid, sub) + b"\xff" + payload
            conn.sendall(C.message(C.CMD_GET, reply, server=True))
        return True


def _scalar_type(code: bytes) -> bytes:
    return (
        b"\x80"
        + C.encode_string("epics:nt/NTScalar:1.0")
        + b"\x01"
        + C.encode_string("value")
        + code
    )


@pytest.fixture
def reader_for() -> Iterator[Callable[[ScriptedServer], NativeReader]]:
    readers: list[NativeReader] = []

    def make(server: ScriptedServer) -> NativeReader:
        reader = NativeReader([server.search_address])
        readers.append(reader)
        return reader

    yield make
    for r in readers:
        r.close()


def _read(reader: NativeReader, name: str, timeout: float = 5.0) -> tuple[Any, str | None]:
    done = threading.Event()
    out: list[tuple[Any, str | None]] = []

    def cb(answers: list[Any]) -> None:
        out.extend((fields and fields["value"], error) for _n, _d, fields, error in answers)
        done.set()

    assert reader.start_reads([name], cb) == []
    assert done.wait(timeout), "no answer"
    return out[0]


def _wait_ready(reader: NativeReader, name: str, timeout: float = 5.0) -> None:
    reader.want([name])
    deadline = time.monotonic() + timeout
    while reader.state(name) != "ready":
        assert time.monotonic() < deadline, reader.state(name)
        time.sleep(0.01)


def test_circuit_lost_mid_read_fails_that_read_then_reinits_with_the_new_type(
    reader_for,
) -> None:
    name = "SCRIPTED:x"
    double = (_scalar_type(b"\x43"), lambda: None)  # first server: dies on the first EXEC
    text = (_scalar_type(b"\x60"), lambda: b"\x01\x02" + C.encode_string("back"))
    with ScriptedServer(name, [double, text]) as server:
        reader = reader_for(server)
        _wait_ready(reader, name)
        value, error = _read(reader, name)
        assert value is None
        assert error is not None and name in error and "connection lost" in error
        _wait_ready(reader, name)  # searched again, a new circuit, INIT again
        assert server.connections == 2
        assert _read(reader, name) == ("back", None)  # parsed with the new (string) type
        assert _read(reader, name) == ("back", None)


def test_a_read_not_taken_natively_is_handed_back(reader_for) -> None:
    name = "SCRIPTED:y"
    answer = (_scalar_type(b"\x43"), lambda: b"\x01\x02" + struct.pack("<d", 4.5))
    with ScriptedServer(name, [answer]) as server:
        reader = reader_for(server)
        assert reader.start_reads([name, "OTHER:z"], lambda *a: None) == [name, "OTHER:z"]
        _wait_ready(reader, name)
        assert _read(reader, name) == (4.5, None)


def test_quiet_circuits_echo_and_unused_ones_close(reader_for, monkeypatch) -> None:
    """pvxs servers drop a client circuit silent for ~40 s: echoes keep it; one no read has
    used for a while is closed, and the I/O thread ends."""
    monkeypatch.setattr(_native, "_ECHO_EVERY", 0.1)
    monkeypatch.setattr(_native, "_CIRCUIT_IDLE", 1.5)
    name = "SCRIPTED:q"
    answer = (_scalar_type(b"\x43"), lambda: b"\x01\x02" + struct.pack("<d", 1.0))
    with ScriptedServer(name, [answer]) as server:
        reader = reader_for(server)
        _wait_ready(reader, name)
        assert _read(reader, name) == (1.0, None)
        time.sleep(0.8)
        assert server.echoes >= 3
        assert reader.state(name) == "ready"
        deadline = time.monotonic() + 5
        while reader.state(name) != "absent" or reader._thread is not None:
            assert time.monotonic() < deadline, (reader.state(name), reader._thread)
            time.sleep(0.02)
        assert server.connections == 1
        _wait_ready(reader, name)  # asked for again: a new circuit
        assert server.connections == 2
        assert _read(reader, name) == (1.0, None)


# --- delta replies: a server that resends only what changed (as pvDatabase does) --------------

#: NTScalar double with alarm and timeStamp: (bit, path, struct format or "s" for a string)
_LEAVES = (
    (1, "value", "d"),
    (3, "alarm.severity", "i"),
    (4, "alarm.status", "i"),
    (5, "alarm.message", "s"),
    (7, "timeStamp.secondsPastEpoch", "q"),
    (8, "timeStamp.nanoseconds", "i"),
    (9, "timeStamp.userTag", "i"),
)


def _full_scalar_type(array: bool = False) -> bytes:
    def struct_of(tid: str, fields: list[tuple[str, bytes]]) -> bytes:
        out = b"\x80" + C.encode_string(tid) + C.encode_size(len(fields))
        return out + b"".join(C.encode_string(n) + t for n, t in fields)

    alarm = struct_of("alarm_t", [("severity", b"\x22"), ("status", b"\x22"), ("message", b"\x60")])
    stamp = struct_of(
        "time_t",
        [("secondsPastEpoch", b"\x23"), ("nanoseconds", b"\x22"), ("userTag", b"\x22")],
    )
    nt = "epics:nt/NTScalarArray:1.0" if array else "epics:nt/NTScalar:1.0"
    value = b"\x4b" if array else b"\x43"  # double[] / double
    return struct_of(nt, [("value", value), ("alarm", alarm), ("timeStamp", stamp)])


class DeltaServer(ScriptedServer):
    """Answers each GET operation as pvDatabase does: the whole structure (bit 0) on its first
    EXEC, then only the leaves that changed since that operation's previous reply, an empty
    bitset if none did.  ``record`` is the PV; the test changes it between reads."""

    def __init__(self, name: str, array: bool = False) -> None:
        super().__init__(name, [(_full_scalar_type(array), lambda: None)])
        self.leaves = ((1, "value", "ad"), *_LEAVES[1:]) if array else _LEAVES
        self.record: dict[str, Any] = {
            "value": [1.0, 2.0, 3.0] if array else 4.5,
            "alarm.severity": 1,
            "alarm.status": 3,
            "alarm.message": "HIGH",
            "timeStamp.secondsPastEpoch": 1_700_000_000,
            "timeStamp.nanoseconds": 0,
            "timeStamp.userTag": 0,
        }
        self.sent: dict[int, dict[str, Any]] = {}  # ioid -> the record as last sent on it
        self.replies: list[set[str]] = []  # the leaves each EXEC reply carried

    def _exec(self, ioid: int) -> bytes:
        now = dict(self.record)
        last = self.sent.get(ioid)
        self.sent[ioid] = now
        if last is None:
            mask, leaves = 1, self.leaves
        else:
            leaves = tuple(leaf for leaf in self.leaves if now[leaf[1]] != last[leaf[1]])
            mask = sum(1 << bit for bit, _p, _f in leaves)
        self.replies.append({p for _b, p, _f in leaves})
        raw = mask.to_bytes((mask.bit_length() + 7) // 8, "little")
        out = C.encode_size(len(raw)) + raw
        for _bit, path, fmt in leaves:
            v = now[path]
            if fmt == "s":
                out += C.encode_string(v)
            elif fmt == "ad":
                out += C.encode_size(len(v)) + struct.pack(f"<{len(v)}d", *v)
            else:
                out += struct.pack("<" + fmt, v)
        return out

    def _serve(
        self, conn: socket.socket, msg: C.Message, desc: bytes, on_exec: Callable[[], bytes | None]
    ) -> bool:
        if msg.command == C.CMD_GET:
            _sid, ioid, sub = struct.unpack_from("<iiB", msg.body, 0)
            if not sub & C.SUB_INIT:
                reply = struct.pack("<iB", ioid, sub) + b"\xff" + self._exec(ioid)
                conn.sendall(C.message(C.CMD_GET, reply, server=True))
                return True
            self.sent.pop(ioid, None)  # a new INIT: the next EXEC sends everything
        return super()._serve(conn, msg, desc, on_exec)


def test_delta_replies_are_merged_into_the_previous_copy(monkeypatch) -> None:
    """A field the server did not resend has not changed since this operation's last reply:
    bulk_get still returns the value, bulk_get_raw still has the alarm, never defaults."""
    name = "DELTA:x"
    with DeltaServer(name) as server:
        _native_on(server, name, monkeypatch)
        assert beampipe_pva.bulk_get([name]) == {name: 4.5}  # the value GET's first EXEC
        server.record["timeStamp.nanoseconds"] = 5
        assert beampipe_pva.bulk_get([name]) == {name: 4.5}
        assert server.replies[-1] == {"timeStamp.nanoseconds"}  # the value was not resent
        assert beampipe_pva.bulk_get([name]) == {name: 4.5}
        assert server.replies[-1] == set()  # nothing changed: an empty bitset
        server.record["value"] = -2.0
        assert beampipe_pva.bulk_get([name]) == {name: -2.0}
        assert server.replies[-1] == {"value"}
        raw = beampipe_pva.bulk_get_raw([name])[name].value  # type: ignore[union-attr]
        server.record["timeStamp.nanoseconds"] = 9
        for expect_sent in ({"timeStamp.nanoseconds"}, set()):
            again = beampipe_pva.bulk_get_raw([name])[name].value  # type: ignore[union-attr]
            assert server.replies[-1] == expect_sent
            assert again["value"] == -2.0
            assert again["alarm.severity"] == 1 and again["alarm.message"] == "HIGH"
            assert again["timeStamp.secondsPastEpoch"] == 1_700_000_000
            assert again["timeStamp.nanoseconds"] == 9
        assert raw["timeStamp.nanoseconds"] == 5 and raw["alarm.status"] == 3


def test_an_array_a_caller_changed_is_not_what_a_delta_read_returns(monkeypatch) -> None:
    """Unchanged fields are carried over from the previous reply: bulk_get hands out copies,
    so a caller that changes its array in place does not change the next read."""
    name = "DELTA:wf"
    with DeltaServer(name, array=True) as server:
        _native_on(server, name, monkeypatch)
        mine = beampipe_pva.bulk_get([name])[name]
        np.testing.assert_array_equal(mine, [1.0, 2.0, 3.0])
        mine[0] = 99.0  # e.g. a background subtracted in place
        server.record["timeStamp.nanoseconds"] = 5
        again = beampipe_pva.bulk_get([name])[name]
        assert server.replies[-1] == {"timeStamp.nanoseconds"}
        np.testing.assert_array_equal(again, [1.0, 2.0, 3.0])


# --- faults on the I/O thread ------------------------------------------------------------


class GarbledMessageServer(ScriptedServer):
    """Sends a 2-byte MESSAGE (an ioid and severity need 5) before the reply to one EXEC."""

    def __init__(self, name: str, garble_on: int) -> None:
        super().__init__(
            name, [(_scalar_type(b"\x43"), lambda: b"\x01\x02" + struct.pack("<d", 1.0))]
        )
        self.garble_on = garble_on
        self.execs = 0

    def _serve(
        self, conn: socket.socket, msg: C.Message, desc: bytes, on_exec: Callable[[], bytes | None]
    ) -> bool:
        if msg.command == C.CMD_GET and not msg.body[8] & C.SUB_INIT:
            self.execs += 1
            if self.execs == self.garble_on:
                conn.sendall(C.message(C.CMD_MESSAGE, b"\x00\x00", server=True))
        return super()._serve(conn, msg, desc, on_exec)


def test_a_malformed_message_drops_its_circuit_not_the_reader(reader_for) -> None:
    name = "GARBLED:x"
    with GarbledMessageServer(name, garble_on=2) as server:
        reader = reader_for(server)
        _wait_ready(reader, name)
        assert _read(reader, name) == (1.0, None)
        value, error = _read(reader, name)
        assert value is None and error is not None
        assert name in error and "protocol error" in error and "server message" in error
        _wait_ready(reader, name)  # the I/O thread lives on: searched again, reconnected
        assert server.connections == 2
        assert _read(reader, name) == (1.0, None)


def test_an_unexpected_error_on_the_io_thread_fails_reads_and_restarts(
    reader_for, monkeypatch, caplog
) -> None:
    name = "BUGGY:x"
    answer = (_scalar_type(b"\x43"), lambda: b"\x01\x02" + struct.pack("<d", 2.0))
    with ScriptedServer(name, [answer]) as server:
        reader = reader_for(server)
        _wait_ready(reader, name)
        crashed = reader._thread
        assert crashed is not None

        def broken(get: Any, reply: Any) -> Any:
            raise RuntimeError("a bug in the reader")

        monkeypatch.setattr(NativeReader, "_merge", staticmethod(broken))
        value, error = _read(reader, name)
        assert value is None and error is not None
        assert name in error and "RuntimeError: a bug in the reader" in error
        assert any("I/O thread failed" in r.message for r in caplog.records)
        crashed.join(5)
        assert not crashed.is_alive()
        # its channel went back to searching, and a new I/O thread took that search over at
        # once (no read or want() needed to start it)
        assert reader._thread is not None and reader._thread is not crashed
        monkeypatch.undo()
        _wait_ready(reader, name)
        assert _read(reader, name) == (2.0, None)


def test_a_read_stuck_on_a_silent_server_fails_with_the_reason(reader_for, monkeypatch) -> None:
    """Without another read coming: the I/O thread's keepalive pass notices it."""
    monkeypatch.setattr(_native, "_STUCK", 0.3)

    class Silent(ScriptedServer):
        def _serve(self, conn: Any, msg: C.Message, desc: bytes, on_exec: Any) -> bool:
            if msg.command == C.CMD_GET and not msg.body[8] & C.SUB_INIT:
                return True  # swallows EXECs
            return super()._serve(conn, msg, desc, on_exec)

    name = "SILENT:x"
    with Silent(name, [(_scalar_type(b"\x43"), lambda: b"")]) as server:
        reader = reader_for(server)
        _wait_ready(reader, name)
        t0 = time.monotonic()
        value, error = _read(reader, name, timeout=3.0)
        assert value is None and error is not None and "GET unanswered for 0.3 s" in error
        assert time.monotonic() - t0 < 1.5
        # queued behind a stuck GET: a second read is failed too, and delivered
        _wait_ready(reader, name)
        got: list[Any] = []
        assert reader.start_reads([name], got.extend) == []
        assert reader.start_reads([name], got.extend) == []  # queued on the same GET
        deadline = time.monotonic() + 3
        while len(got) < 2:
            assert time.monotonic() < deadline, got
            time.sleep(0.02)
        assert all(e is not None and "unanswered" in e for _n, _d, _f, e in got)


def test_a_native_read_unanswered_at_the_deadline_says_so(monkeypatch, caplog) -> None:
    caplog.set_level(logging.WARNING, logger="beampipe.pva")

    class Silent(ScriptedServer):
        def _serve(self, conn: Any, msg: C.Message, desc: bytes, on_exec: Any) -> bool:
            if self.mute and msg.command == C.CMD_GET and not msg.body[8] & C.SUB_INIT:
                return True  # swallows EXECs once muted
            return super()._serve(conn, msg, desc, on_exec)

    name = "MUTE:x"
    answer = (_scalar_type(b"\x43"), lambda: b"\x01\x02" + struct.pack("<d", 3.0))
    with Silent(name, [answer]) as server:
        server.mute = False
        _native_on(server, name, monkeypatch)
        assert beampipe_pva.bulk_get([name]) == {name: 3.0}
        server.mute = True
        caplog.clear()
        assert beampipe_pva.bulk_get([name], timeout=0.3) == {name: None}
        assert any(
            name in r.message and "no answer in time to its native GET" in r.message
            for r in caplog.records
        ), [r.message for r in caplog.records]


# --- servers that fail, names that are not found: bounded retries -------------------------


def test_a_server_that_refuses_circuits_is_given_up_on(reader_for, monkeypatch) -> None:
    monkeypatch.setattr(_native, "_SERVER_HOLD", (0.05, 0.1, 0.2, 2.0))

    class Refuses(ScriptedServer):
        def _serve(self, conn: Any, msg: C.Message, desc: bytes, on_exec: Any) -> bool:
            if msg.command == C.CMD_VALIDATION:  # e.g. an auth method it will not accept
                refusal = b"\x02" + C.encode_string("denied") + C.encode_string("")
                conn.sendall(C.message(C.CMD_CONNECTION_VALIDATED, refusal, server=True))
                return True
            return super()._serve(conn, msg, desc, on_exec)

    name = "REFUSE:x"
    with Refuses(name, [(_scalar_type(b"\x43"), lambda: b"")]) as server:
        reader = reader_for(server)
        reader.want([name])
        deadline = time.monotonic() + 5
        while reader.state(name) != "failed":
            assert time.monotonic() < deadline, (reader.state(name), server.connections)
            time.sleep(0.02)
        assert server.connections == _native._SERVER_GIVE_UP
        reader.want([name])  # held off: p4p serves it, no new search or circuit
        time.sleep(1.0)
        assert server.connections == _native._SERVER_GIVE_UP
        assert reader.state(name) == "failed"


def test_names_not_found_are_searched_again_only_after_a_growing_hold_off(monkeypatch) -> None:
    """PVs the native search cannot reach (behind a gateway or name server) are read through
    p4p; re-asking for them on every batch must not cost a search each time."""
    monkeypatch.setattr(_native, "_SEARCH_BACKOFF", (0.0, 0.01, 0.02))
    monkeypatch.setattr(_native, "_FAILED_HOLD", (0.5, 1.0, 100.0))
    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sink.bind(("127.0.0.1", 0))
    sink.setblocking(False)
    reader = NativeReader([sink.getsockname()])
    names = [f"NOWHERE:{i}" for i in range(5)]
    searched = 0
    try:
        t0 = time.monotonic()
        while time.monotonic() - t0 < 2.5:
            reader.want(names)  # as PvaGetIO does after each batch served by p4p
            time.sleep(0.05)
            with contextlib.suppress(BlockingIOError):
                while True:
                    searched += sink.recv(65536).count(b"NOWHERE:")
        assert {reader.state(n) for n in names} == {"failed"}
    finally:
        reader.close()
        sink.close()
    # three rounds (at 0, after 0.5 s, after 1 s more) of three searches each
    assert searched == 3 * 3 * len(names)


def test_search_asks_no_reply_for_names_a_server_does_not_have() -> None:
    """Flags 0x80, not 0x81: a pvxs server answers only for names it has."""
    name = f"BPFLAG{time.monotonic_ns() % 10**9}:x"
    server = Server(providers=[{name: SharedPV(initial=NTScalar("d").wrap(1.0))}])
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    udp.settimeout(0.5)
    port = int(server.conf()["EPICS_PVAS_BROADCAST_PORT"])
    try:
        for cid, pv in ((1, name + "nope"), (2, name)):
            request = C.search_request(cid, [(cid, pv)], udp.getsockname()[1])
            udp.sendto(request, ("127.0.0.1", port))
        replies = []
        with contextlib.suppress(TimeoutError):
            while True:
                reply = C.parse_search_response(udp.recvfrom(65536)[0], "127.0.0.1")
                if reply is not None:
                    replies.append(reply)
        # (pvxs may answer the found one twice: it also hears its own unicast forward)
        assert {(r.found, r.cids) for r in replies} == {(True, (2,))}
    finally:
        udp.close()
        server.stop()


def test_fields_first_sent_in_a_later_reply_survive_a_reply_with_the_first_bitset() -> None:
    """A first reply with only value, a delta adding alarm, then value alone again: the copy
    keeps alarm (the server says it has not changed), it is not cut back to the first shape."""
    from types import SimpleNamespace

    from beampipe_pva._native import NativeReader

    get = SimpleNamespace(last=None, base_bits=None)
    alarm = {"severity": 1, "status": 0, "message": "HIGH"}

    def reply(value: dict, bits: bytes, complete: bool = False) -> SimpleNamespace:
        return SimpleNamespace(value=value, bits=bits, complete=complete)

    assert NativeReader._merge(get, reply({"value": 1.0}, b"\x02")) == {"value": 1.0}
    merged = NativeReader._merge(get, reply({"value": 2.0, "alarm": alarm}, b"\x06"))
    assert merged == {"value": 2.0, "alarm": alarm}
    assert NativeReader._merge(get, reply({"value": 3.0}, b"\x02")) == {
        "value": 3.0,
        "alarm": alarm,
    }
    assert NativeReader._merge(get, reply({}, b"")) == {"value": 3.0, "alarm": alarm}
    # a complete reply sets the shape again
    assert NativeReader._merge(get, reply({"value": 4.0}, b"\x02", complete=True)) == {"value": 4.0}
