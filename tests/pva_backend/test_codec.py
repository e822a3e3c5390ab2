"""The sans-I/O pvAccess codec on in-memory bytes, built here from the protocol spec."""

from __future__ import annotations

import math
import socket
import struct
from typing import Any

import numpy as np
import pytest

from beampipe_pva import _codec as C


def s(text: str) -> bytes:
    return C.encode_string(text)


def struct_type(tid: str, fields: list[tuple[str, bytes]]) -> bytes:
    return b"\x80" + s(tid) + C.encode_size(len(fields)) + b"".join(s(n) + t for n, t in fields)


DOUBLE, INT, LONG, STRING, BOOL = b"\x43", b"\x22", b"\x23", b"\x60", b"\x00"
DOUBLE_ARRAY, STRING_ARRAY = b"\x4b", b"\x68"

ALARM = struct_type("alarm_t", [("severity", INT), ("status", INT), ("message", STRING)])
STAMP = struct_type("time_t", [("secondsPastEpoch", LONG), ("nanoseconds", INT), ("userTag", INT)])
NTSCALAR = struct_type(
    "epics:nt/NTScalar:1.0",
    [("value", DOUBLE), ("alarm", ALARM), ("timeStamp", STAMP), ("units", STRING)],
)
# bits: 0 root, 1 value, 2 alarm, 3 severity, 4 status, 5 message,
#       6 timeStamp, 7 secondsPastEpoch, 8 nanoseconds, 9 userTag, 10 units


def bitset(*bits: int) -> bytes:
    n = 0
    for b in bits:
        n |= 1 << b
    raw = n.to_bytes((n.bit_length() + 7) // 8 or 1, "little").rstrip(b"\0")
    return C.encode_size(len(raw)) + raw


def desc_of(type_bytes: bytes) -> C.FieldDesc:
    desc, pos = C.read_type(type_bytes, 0, "<", {})
    assert desc is not None and pos == len(type_bytes)
    return desc


def exec_reply(ioid: int, payload: bytes, order: str = "<") -> bytes:
    return struct.pack(order + "iB", ioid, 0) + b"\xff" + payload


def test_whole_structure_reply() -> None:
    desc = desc_of(NTSCALAR)
    payload = (
        bitset(0)
        + struct.pack("<d", 2.5)
        + struct.pack("<ii", 2, 3)
        + s("HIGH")
        + struct.pack("<qii", 1_700_000_000, 25, 0)
        + s("mm")
    )
    reply = C.parse_get_reply(exec_reply(7, payload), "<", {}, lambda _: desc)
    assert reply.ioid == 7 and reply.error is None and not reply.init and reply.complete
    assert reply.value == {
        "value": 2.5,
        "alarm": {"severity": 2, "status": 3, "message": "HIGH"},
        "timeStamp": {"secondsPastEpoch": 1_700_000_000, "nanoseconds": 25, "userTag": 0},
        "units": "mm",
    }


def test_partial_reply_carries_only_the_marked_fields_and_says_it_is_a_delta() -> None:
    """Parsing only: the client merges a delta into its previous copy (test_native)."""
    desc = desc_of(NTSCALAR)
    # value, alarm.message and the whole timeStamp: what changed since the last reply.
    payload = bitset(1, 5, 6) + struct.pack("<d", -1.0) + s("") + struct.pack("<qii", 5, 6, 7)
    reply = C.parse_get_reply(exec_reply(1, payload), "<", {}, lambda _: desc)
    assert reply.value == {
        "value": -1.0,
        "alarm": {"message": ""},
        "timeStamp": {"secondsPastEpoch": 5, "nanoseconds": 6, "userTag": 7},
    }
    assert not reply.complete
    # every leaf marked one by one (no structure bit) is complete too
    leaves = bitset(1, 3, 4, 5, 7, 8, 9, 10)
    every = leaves + struct.pack("<dii", 1.0, 0, 0) + s("") + struct.pack("<qii", 1, 2, 3) + s("")
    assert C.parse_get_reply(exec_reply(1, every), "<", {}, lambda _: desc).complete
    nothing = C.parse_get_reply(exec_reply(1, b"\x00"), "<", {}, lambda _: desc)
    assert nothing.value == {} and not nothing.complete
    # with only ``value`` kept, a reply marking ``value`` is complete, one without it is not
    keep = frozenset(["value"])
    only_value = bitset(1) + struct.pack("<d", 3.0)
    assert C.parse_get_reply(exec_reply(1, only_value), "<", {}, lambda _: desc, keep).complete
    stamp = bitset(6) + struct.pack("<qii", 5, 6, 7)
    assert not C.parse_get_reply(exec_reply(1, stamp), "<", {}, lambda _: desc, keep).complete


def test_projection_skips_fields_without_decoding_them() -> None:
    desc = desc_of(NTSCALAR)
    payload = (
        bitset(0)
        + struct.pack("<d", 9.0)
        + struct.pack("<ii", 0, 0)
        + s("x" * 300)  # a long string is skipped by its length, too
        + struct.pack("<qii", 1, 2, 3)
        + s("mm")
    )
    body = exec_reply(1, payload)
    reply = C.parse_get_reply(body, "<", {}, lambda _: desc, frozenset(["value"]))
    assert reply.value == {"value": 9.0}
    full = C.parse_get_reply(body, "<", {}, lambda _: desc)
    assert full.value is not None and full.value["alarm"]["message"] == "x" * 300


def test_arrays_and_string_arrays() -> None:
    desc = desc_of(
        struct_type(
            "epics:nt/NTScalarArray:1.0",
            [("value", DOUBLE_ARRAY), ("labels", STRING_ARRAY), ("flag", BOOL)],
        )
    )
    values = np.array([1.0, -2.0, math.pi])
    payload = (
        bitset(0)
        + C.encode_size(3)
        + values.astype("<f8").tobytes()
        + C.encode_size(2)
        + s("a")
        + s("bé")
        + b"\x01"
    )
    reply = C.parse_get_reply(exec_reply(1, payload), "<", {}, lambda _: desc)
    assert reply.value is not None
    np.testing.assert_array_equal(reply.value["value"], values)
    assert reply.value["value"].flags.writeable  # a copy, not a view on the message
    assert reply.value["labels"] == ["a", "bé"]
    assert reply.value["flag"] is True


def test_big_endian_reply() -> None:
    desc = desc_of(struct_type("", [("value", DOUBLE), ("n", INT), ("a", DOUBLE_ARRAY)]))
    payload = (
        bitset(0)
        + struct.pack(">di", 1.25, -3)
        + C.encode_size(2)
        + np.array([1.0, 2.0], ">f8").tobytes()
    )
    reply = C.parse_get_reply(exec_reply(4, payload, ">"), ">", {}, lambda _: desc)
    assert reply.ioid == 4
    assert reply.value is not None
    assert reply.value["value"] == 1.25 and reply.value["n"] == -3
    np.testing.assert_array_equal(reply.value["a"], [1.0, 2.0])
    assert reply.value["a"].dtype == np.dtype(float)


def test_type_cache_definitions_are_reused() -> None:
    cache: dict[int, C.FieldDesc] = {}
    first = b"\xfd" + struct.pack("<h", 3) + ALARM
    a, pos = C.read_type(first, 0, "<", cache)
    assert pos == len(first) and a is not None and a.fields[0][0] == "severity"
    b, pos = C.read_type(b"\xfe" + struct.pack("<h", 3), 0, "<", cache)
    assert b is a and pos == 3
    with pytest.raises(C.ProtocolError, match="never defined"):
        C.read_type(b"\xfe" + struct.pack("<h", 4), 0, "<", cache)


def test_init_reply_gives_the_type_and_errors_give_the_servers_text() -> None:
    body = struct.pack("<iB", 5, C.SUB_INIT) + b"\xff" + NTSCALAR
    reply = C.parse_get_reply(body, "<", {}, lambda _: None)
    assert reply.init and reply.desc is not None and reply.desc.id == "epics:nt/NTScalar:1.0"
    assert reply.desc.supported()
    bad = struct.pack("<iB", 5, 0) + b"\x02" + s("no such field") + s("trace")
    reply = C.parse_get_reply(bad, "<", {}, lambda _: None)
    assert reply.error == "no such field" and reply.value is None


def test_unions_are_unsupported_so_p4p_reads_them() -> None:
    union = b"\x81" + s("") + C.encode_size(1) + s("ubyteValue") + b"\x2c"
    desc = desc_of(struct_type("epics:nt/NTNDArray:1.0", [("value", union)]))
    assert not desc.supported()
    with pytest.raises(C.Unsupported):
        desc.plan(b"\x01", "<")


def test_malformed_replies_are_protocol_errors() -> None:
    desc = desc_of(NTSCALAR)
    whole = bitset(0) + struct.pack("<d", 1.0)  # ...and nothing of the rest
    with pytest.raises(C.ProtocolError):
        C.parse_get_reply(exec_reply(1, whole), "<", {}, lambda _: desc)
    trailing = bitset(1) + struct.pack("<d", 1.0) + b"junk"
    with pytest.raises(C.ProtocolError, match="4 bytes after"):
        C.parse_get_reply(exec_reply(1, trailing), "<", {}, lambda _: desc)
    with pytest.raises(C.ProtocolError, match="never INITed"):
        C.parse_get_reply(exec_reply(1, bitset(1)), "<", {}, lambda _: None)
    array = desc_of(struct_type("", [("value", DOUBLE_ARRAY)]))
    short = bitset(0) + C.encode_size(100) + b"\0" * 16
    with pytest.raises(C.ProtocolError, match="runs past"):
        C.parse_get_reply(exec_reply(1, short), "<", {}, lambda _: array)


@pytest.mark.parametrize(
    ("parse", "body"),
    [
        (C.parse_message, b"\x00\x00"),
        (C.parse_message, struct.pack("<iB", 1, 0) + b"\x09ab"),
        (C.parse_create_channel_reply, b"\x01\x00\x00"),
        (C.parse_create_channel_reply, struct.pack("<ii", 1, 2)),
        (C.parse_connection_validated, b""),
        (C.parse_destroy_channel, b"\x01"),
        (C.parse_ioid, b"\x01\x02"),
        (C.parse_validation, b"\x00\x00"),
    ],
)
def test_short_server_messages_are_protocol_errors(parse: Any, body: bytes) -> None:
    """Never struct.error or IndexError: the client drops that circuit, not its I/O thread."""
    with pytest.raises(C.ProtocolError, match=r"truncated|runs past"):
        parse(body, "<")


def test_framer_splits_joins_and_keeps_each_messages_byte_order() -> None:
    stream = (
        struct.pack("<BBBBI", 0xCA, 2, 0x01 | 0x80 | 0x40, 2, 0)  # control: skipped
        + C.message(C.CMD_ECHO, b"abc")
        + C.message(C.CMD_GET, b"x" * 300, ">")
    )
    framer = C.Framer()
    got: list[C.Message] = []
    for i in range(0, len(stream), 7):  # dribbled in 7-byte pieces
        got += framer.feed(stream[i : i + 7])
    assert [(m.command, m.order, m.body) for m in got] == [
        (C.CMD_ECHO, "<", b"abc"),
        (C.CMD_GET, ">", b"x" * 300),
    ]


def test_framer_joins_segments_and_rejects_garbage() -> None:
    def seg(flag: int, body: bytes) -> bytes:
        return struct.pack("<BBBBI", 0xCA, 2, flag, C.CMD_GET, len(body)) + body

    framer = C.Framer()
    msgs = framer.feed(seg(0x10, b"ab") + seg(0x30, b"cd") + seg(0x20, b"ef"))
    assert [(m.command, m.body) for m in msgs] == [(C.CMD_GET, b"abcdef")]
    with pytest.raises(C.ProtocolError, match="magic"):
        C.Framer().feed(b"HTTP/1.1 200 OK\r\n")


def test_client_messages_are_well_formed() -> None:
    framer = C.Framer()
    (msg,) = framer.feed(C.create_channel(12, "IOC:x"))
    assert msg.command == C.CMD_CREATE_CHANNEL
    assert msg.body == struct.pack("<Hi", 1, 12) + s("IOC:x")
    (msg,) = framer.feed(C.get_exec(3, 4))
    assert msg.body == struct.pack("<iiB", 3, 4, 0)
    (msg,) = framer.feed(C.get_init(3, 4))
    assert msg.body[8:] == bytes([C.SUB_INIT]) + b"\x80\x00\x00"  # field(): the whole PV
    (msg,) = framer.feed(C.get_init(3, 4, ("value",)))
    # field(value): structure {field: structure {value: structure {}}}, and no value bytes
    assert msg.body[9:] == struct_type("", [("field", struct_type("", [("value", b"\x80\0\0")]))])
    assert C.encode_size(300) == b"\xfe" + struct.pack("<i", 300)


def test_validation_answers_with_ca_identity_when_offered() -> None:
    (msg,) = C.Framer().feed(C.client_validation(["anonymous", "ca"], "op", "bl01"))
    assert msg.command == C.CMD_VALIDATION
    assert msg.body[8:11] == s("ca")
    auth_type = b"\x80" + s("") + b"\x02" + s("user") + b"\x60" + s("host") + b"\x60"
    assert msg.body[11:] == auth_type + s("op") + s("bl01")
    (msg,) = C.Framer().feed(C.client_validation(["anonymous"], "op", "bl01"))
    assert msg.body[8:] == s("anonymous") + b"\xff"
    server_hello = struct.pack("<ih", 16384, 512) + C.encode_size(2) + s("anonymous") + s("ca")
    assert C.parse_validation(server_hello, "<") == (16384, ["anonymous", "ca"])


def test_search_round_trip() -> None:
    request = C.search_request(9, [(1, "A:x"), (2, "B:y")], 40000)
    (msg,) = C.Framer().feed(request)
    assert msg.command == C.CMD_SEARCH
    seq, flags = struct.unpack_from("<IB", msg.body, 0)
    assert seq == 9 and flags == 0x80  # unicast, no reply required (see test_native)
    # A server's answer: GUID, sequence, its address and port, "tcp", found, cids.
    addr = b"\0" * 10 + b"\xff\xff" + socket.inet_aton("127.0.0.2")
    body = b"G" * 12 + struct.pack("<I", 9) + addr + struct.pack("<H", 5075)
    body += s("tcp") + b"\x01" + struct.pack("<HII", 2, 1, 2)
    reply = C.parse_search_response(C.message(C.CMD_SEARCH_RESPONSE, body, server=True), "x")
    assert reply == C.SearchReply("127.0.0.2", 5075, True, (1, 2))
    anywhere = b"G" * 12 + struct.pack("<I", 9) + b"\0" * 16 + struct.pack("<H", 5075)
    anywhere += s("tcp") + b"\x01" + struct.pack("<HI", 1, 1)
    reply = C.parse_search_response(C.message(C.CMD_SEARCH_RESPONSE, anywhere), "10.0.0.5")
    assert reply is not None and reply.host == "10.0.0.5"  # "any" means: where it came from
    assert C.parse_search_response(C.message(C.CMD_SEARCH, b""), "x") is None
    # A datagram whose protocol string runs past its end (anyone on the subnet can send one)
    # is ignored, not an error that would reach the reader's I/O thread.
    cut = b"G" * 12 + struct.pack("<I", 9) + addr + struct.pack("<H", 5075) + b"\x20tc"
    assert C.parse_search_response(C.message(C.CMD_SEARCH_RESPONSE, cut), "x") is None


def test_p4p_type_and_value_match_the_wire_type() -> None:
    desc = desc_of(NTSCALAR)
    value = desc.p4p_value({"value": 2.0, "alarm": {"severity": 1}})
    assert value.getID() == "epics:nt/NTScalar:1.0"
    assert value["value"] == 2.0 and value["alarm.severity"] == 1
    assert value["units"] == ""  # not sent: the default, as p4p itself would show


def test_decoding_native_fields_never_fills_in_defaults() -> None:
    """A field missing after the reader's merge is a failed read naming the PV, not 0 or ''."""
    from beampipe_pva._decode import DecodeError, decode_fields

    scalar = desc_of(NTSCALAR)
    assert decode_fields(scalar, {"value": 2.5}, "A:x") == 2.5
    with pytest.raises(DecodeError, match=r"pva://A:x: .*reply holds no 'value'"):
        decode_fields(scalar, {"alarm": {"severity": 0}}, "A:x")
    enum_value = struct_type("enum_t", [("index", INT), ("choices", STRING_ARRAY)])
    enum = desc_of(struct_type("epics:nt/NTEnum:1.0", [("value", enum_value)]))
    assert decode_fields(enum, {"value": {"index": 1, "choices": ["a", "b"]}}, "E:x") == "b"
    with pytest.raises(DecodeError, match="pva://E:x: NTEnum value without index and choices"):
        decode_fields(enum, {"value": {"index": 1}}, "E:x")
    columns = struct_type("", [("a", DOUBLE_ARRAY), ("b", DOUBLE_ARRAY)])
    table = desc_of(struct_type("epics:nt/NTTable:1.0", [("value", columns)]))
    with pytest.raises(DecodeError, match=r"pva://T:x: NTTable reply has columns \['a'\]"):
        decode_fields(table, {"value": {"a": np.zeros(2)}}, "T:x")
