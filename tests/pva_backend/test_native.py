"""The native read path (persistent GETs) on real servers, and its faults.

The first read of a PV goes through p4p while the native reader connects it;
from then on reads are EXECs of one persistent GET.  These tests wait for
that switch, then check the values against p4p's own reads of the same PV.
"""

from __future__ import annotations

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


def wait_native(names: list[str], states: tuple[str, ...] = ("ready",), timeout: float = 5.0):
    """Read until the native path has taken these PVs (it does from a PV's second read)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        beampipe_pva.bulk_get_raw(names, timeout=1.0)
        if all(beampipe_pva.native_state(n) in states for n in names):
            return
        time.sleep(0.02)
    got = {n: beampipe_pva.native_state(n) for n in names}
    raise AssertionError(f"native path not {states} in {timeout} s: {got}")


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
