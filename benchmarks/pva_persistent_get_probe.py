"""Probe: what 100 pvAccess GETs cost when each GET operation is kept and re-executed.

    .venv/bin/python benchmarks/pva_persistent_get_probe.py

Not part of the plugin: the measurement that led to its native read path
(``beampipe_pva._codec`` / ``_native``), kept as the plain-Python baseline
(a field-by-field parse, no batching layer).  p4p makes every
read a new operation (INIT with a type exchange, EXEC, then a blocking
close).  pvAccess itself lets a client INIT a get once and EXEC it again and
again; pvxs has that as ``reExecGet`` (and ``syncCancel(false)`` for cheap
closes), p4p 4.3 exposes neither.  To know what that would buy before asking
for it, this probe speaks just enough of the protocol in plain Python
(search, connection validation, create channel, get INIT once, then EXEC
per read) and times it against p4p ``Context.get(list)`` on the same QSRV in
the same run.  It checks every value against p4p's before timing.  Loopback
only, little-endian client; no reconnects, no segmentation, no auth beyond
"anonymous": a measurement, not a client.
"""

from __future__ import annotations

import os
import select
import socket
import statistics
import struct
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

N = 100
SCALAR_CODES = {
    0x00: "?",
    0x20: "b",
    0x21: "h",
    0x22: "i",
    0x23: "q",
    0x24: "B",
    0x25: "H",
    0x26: "I",
    0x27: "Q",
    0x42: "f",
    0x43: "d",
}


def enc_size(n: int) -> bytes:
    return bytes([n]) if n < 254 else b"\xfe" + struct.pack("<i", n)


def enc_str(s: str) -> bytes:
    b = s.encode()
    return enc_size(len(b)) + b


def message(cmd: int, payload: bytes) -> bytes:
    return struct.pack("<BBBBI", 0xCA, 2, 0x00, cmd, len(payload)) + payload


class Reader:
    def __init__(self, data: bytes, pos: int = 0, order: str = "<") -> None:
        self.data, self.pos, self.order = data, pos, order

    def u8(self) -> int:
        v = self.data[self.pos]
        self.pos += 1
        return v

    def unpack(self, fmt: str) -> tuple[Any, ...]:
        fmt = self.order + fmt
        v = struct.unpack_from(fmt, self.data, self.pos)
        self.pos += struct.calcsize(fmt)
        return v

    def size(self) -> int:
        n = self.u8()
        if n == 255:
            return -1
        if n == 254:
            (n,) = self.unpack("i")
        return n

    def string(self) -> str:
        n = self.size()
        s = bytes(self.data[self.pos : self.pos + max(n, 0)]).decode()
        self.pos += max(n, 0)
        return s

    def status(self) -> str | None:
        kind = self.u8()
        if kind == 0xFF:
            return None
        msg = self.string()
        self.string()
        return f"status {kind}: {msg}"


class Desc:
    def __init__(self, code: int, fields: list[tuple[str, Desc]] | None = None) -> None:
        self.code, self.fields = code, fields or []
        self.nbits = 1 + sum(f.nbits for _, f in self.fields) if code == 0x80 else 1


def read_desc(r: Reader, cache: dict[int, Desc]) -> Desc | None:
    code = r.u8()
    if code == 0xFF:
        return None
    if code == 0xFD:
        (key,) = r.unpack("h")
        desc = read_desc(r, cache)
        assert desc is not None
        cache[key] = desc
        return desc
    if code == 0xFE:
        (key,) = r.unpack("h")
        return cache[key]
    if code in (0x80, 0x81):
        r.string()
        fields = []
        for _ in range(r.size()):
            name = r.string()
            sub = read_desc(r, cache)
            assert sub is not None
            fields.append((name, sub))
        return Desc(code, fields)
    if code in (0x88, 0x89):
        elem = read_desc(r, cache)
        return Desc(code, [("", elem)] if elem else [])
    if code & 0x18 in (0x10, 0x18):
        r.size()
    return Desc(code)


def read_value(r: Reader, d: Desc, cache: dict[int, Desc]) -> Any:
    code = d.code
    if code == 0x80:
        return {name: read_value(r, f, cache) for name, f in d.fields}
    if code == 0x81:
        sel = r.size()
        return None if sel < 0 else read_value(r, d.fields[sel][1], cache)
    if code == 0x82:
        sub = read_desc(r, cache)
        return None if sub is None else read_value(r, sub, cache)
    if code == 0x88:
        return [read_value(r, d.fields[0][1], cache) if r.u8() else None for _ in range(r.size())]
    base, array = code & 0xE7, code & 0x18
    if base == 0x60:
        return [r.string() for _ in range(r.size())] if array else r.string()
    fmt = SCALAR_CODES[base]
    if array:
        n = r.size()
        a = np.frombuffer(r.data, dtype=r.order + fmt, count=n, offset=r.pos).copy()
        r.pos += a.nbytes
        return a
    return r.unpack(fmt)[0]


def read_partial(r: Reader, d: Desc, bits: int, bit: int, cache: dict[int, Desc]) -> Any:
    if bits >> bit & 1:
        return read_value(r, d, cache)
    if d.code != 0x80:
        return None
    out, bit = {}, bit + 1
    for name, f in d.fields:
        v = read_partial(r, f, bits, bit, cache)
        if v is not None:
            out[name] = v
        bit += f.nbits
    return out or None


class Circuit:
    def __init__(self, addr: tuple[str, int]) -> None:
        self.sock = socket.create_connection(addr, timeout=5)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.rx = bytearray()
        self.cache: dict[int, Desc] = {}
        self.order = "<"
        while True:
            cmd, body = self.recv()
            if cmd == 1:  # server's connection validation: answer as an anonymous client
                self.sock.sendall(
                    message(
                        1, struct.pack("<ihh", 1 << 16, 0x7FFF, 0) + enc_str("anonymous") + b"\xff"
                    )
                )
            elif cmd == 9:
                err = Reader(body, order=self.order).status()
                if err:
                    raise ConnectionError(err)
                return

    def recv(self) -> tuple[int, bytes]:
        while True:
            if len(self.rx) >= 8:
                flags, cmd = self.rx[2], self.rx[3]
                order = ">" if flags & 0x80 else "<"
                if flags & 0x01:  # control message (byte order, echo): header only
                    self.order = order
                    del self.rx[:8]
                    continue
                (size,) = struct.unpack_from(order + "I", self.rx, 4)
                if len(self.rx) >= 8 + size:
                    body = bytes(self.rx[8 : 8 + size])
                    del self.rx[: 8 + size]
                    return cmd, body
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                raise ConnectionError("server closed the connection")
            self.rx += chunk


def search(names: list[str], port: int) -> dict[str, tuple[str, int]]:
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    reply_addr = b"\0" * 10 + b"\xff\xff" + socket.inet_aton("127.0.0.1")
    payload = struct.pack("<IB3x", 1, 0x81) + reply_addr + struct.pack("<H", udp.getsockname()[1])
    payload += enc_size(1) + enc_str("tcp") + struct.pack("<H", len(names))
    payload += b"".join(struct.pack("<I", i) + enc_str(n) for i, n in enumerate(names))
    found: dict[str, tuple[str, int]] = {}
    deadline = time.monotonic() + 5
    while len(found) < len(names) and time.monotonic() < deadline:
        if not select.select([udp], [], [], 0.0)[0]:
            udp.sendto(message(3, payload), ("127.0.0.1", port))  # (re)search, as pvxs does
        if not select.select([udp], [], [], 0.3)[0]:
            continue
        data, src = udp.recvfrom(65536)
        if data[3] != 4:
            continue
        r = Reader(data, 8, ">" if data[2] & 0x80 else "<")
        r.pos += 16
        addr = bytes(data[r.pos : r.pos + 16])
        r.pos += 16
        (server_port,) = r.unpack("H")
        r.string()
        r.u8()
        (count,) = r.unpack("H")
        host = socket.inet_ntoa(addr[12:]) if any(addr[12:]) else src[0]
        for i in r.unpack(f"{count}I"):
            found[names[i]] = (host, server_port)
    udp.close()
    return found


def main() -> int:
    from beampipe.testing import Ioc, pin_epics_to_loopback

    pin_epics_to_loopback()
    from p4p.client.thread import Context

    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "probe.db"
        db.write_text(
            "".join(
                f'record(ao, "$(P)s{i}") {{ field(VAL, "{i}") field(PINI, "YES") }}\n'
                for i in range(N)
            )
        )
        with Ioc(db) as ioc:
            names = [ioc.pv(f"s{i}") for i in range(N)]
            where = search(names, int(os.environ["EPICS_PVA_BROADCAST_PORT"]))
            if len(where) != N or len(set(where.values())) != 1:
                raise SystemExit(f"probe aborted: search found {len(where)} of {N} on one server")
            circuit = Circuit(next(iter(where.values())))
            sock = circuit.sock
            sock.sendall(
                b"".join(
                    message(7, struct.pack("<Hi", 1, i) + enc_str(n)) for i, n in enumerate(names)
                )
            )
            sids: dict[int, int] = {}
            while len(sids) < N:
                cmd, body = circuit.recv()
                if cmd == 7:
                    r = Reader(body, order=circuit.order)
                    cid, sid = r.unpack("ii")
                    if err := r.status():
                        raise SystemExit(f"probe aborted: create channel {names[cid]}: {err}")
                    sids[cid] = sid
            empty_request = b"\x80\x00\x00"  # structure, no id, no fields: the whole PV
            sock.sendall(
                b"".join(
                    message(10, struct.pack("<iiB", sids[i], i, 0x08) + empty_request)
                    for i in range(N)
                )
            )
            types: dict[int, Desc] = {}
            while len(types) < N:
                cmd, body = circuit.recv()
                if cmd == 10:
                    r = Reader(body, order=circuit.order)
                    (ioid,) = r.unpack("i")
                    r.u8()
                    if err := r.status():
                        raise SystemExit(f"probe aborted: get INIT {names[ioid]}: {err}")
                    desc = read_desc(r, circuit.cache)
                    assert desc is not None
                    types[ioid] = desc
            execute = b"".join(message(10, struct.pack("<iiB", sids[i], i, 0x00)) for i in range(N))

            def get_all() -> dict[int, Any]:
                sock.sendall(execute)
                out: dict[int, Any] = {}
                while len(out) < N:
                    cmd, body = circuit.recv()
                    if cmd != 10:
                        continue
                    r = Reader(body, order=circuit.order)
                    (ioid,) = r.unpack("i")
                    r.u8()
                    if err := r.status():
                        raise SystemExit(f"probe aborted: get {names[ioid]}: {err}")
                    nbytes = r.size()
                    bits = int.from_bytes(body[r.pos : r.pos + nbytes], "little")
                    r.pos += nbytes
                    out[ioid] = read_partial(r, types[ioid], bits, 0, circuit.cache)
                return out

            with Context("pva", nt=False) as ctx:
                theirs = ctx.get(names)
                ours = get_all()
                for i in range(N):
                    if ours[i]["value"] != theirs[i]["value"]:
                        raise SystemExit(f"probe aborted: {names[i]} read {ours[i]['value']}")
                t_ours, t_p4p = [], []
                for _ in range(50):
                    t0 = time.perf_counter()
                    get_all()
                    t_ours.append(time.perf_counter() - t0)
                    t0 = time.perf_counter()
                    ctx.get(names)
                    t_p4p.append(time.perf_counter() - t0)
            sock.close()
    ours_ms, p4p_ms = statistics.median(t_ours) * 1e3, statistics.median(t_p4p) * 1e3
    print(f"{N} GETs, persistent operations (Python probe): {ours_ms:7.3f} ms")
    print(
        f"{N} GETs, p4p Context.get(list):                {p4p_ms:7.3f} ms  x{p4p_ms / ours_ms:.2f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
