"""Write a tiny MaxMind DB file (format 2.0, IPv4 tree, 24-bit records) for
tests of the country rules, following the MaxMind DB File Format
Specification: a binary search tree, 16 zero octets, the data section, then
the metadata map after "\\xab\\xcd\\xefMaxMind.com"."""
from __future__ import annotations

import ipaddress
import struct
import time
from typing import Any


def _ctrl(type_: int, size: int) -> bytes:
    assert size < 29
    if type_ <= 7:
        return bytes([type_ << 5 | size])
    return bytes([size, type_ - 7])  # extended type


def _uint(type_: int, value: int) -> bytes:
    raw = value.to_bytes((value.bit_length() + 7) // 8, "big") if value else b""
    return _ctrl(type_, len(raw)) + raw


def encode(value: Any) -> bytes:
    if isinstance(value, str):
        raw = value.encode()
        return _ctrl(2, len(raw)) + raw
    if isinstance(value, bool):
        return _ctrl(14, int(value))
    if isinstance(value, int):
        return _uint(6 if value < 2 ** 32 else 9, value)
    if isinstance(value, dict):
        return _ctrl(7, len(value)) + b"".join(encode(k) + encode(v) for k, v in value.items())
    if isinstance(value, list):
        return _ctrl(11, len(value)) + b"".join(encode(v) for v in value)
    raise TypeError(value)


def write_mmdb(path: str, networks: dict[str, dict], database_type: str = "Test-Country") -> None:
    """``networks`` maps IPv4 CIDRs to their records (GeoIP2 style:
    ``{"country": {"iso_code": "DE"}}``)."""
    data = b""
    nodes: list[list[Any]] = [[None, None]]
    for cidr, record in networks.items():
        net = ipaddress.IPv4Network(cidr)
        offset = len(data)
        data += encode(record)
        bits = format(int(net.network_address), "032b")[:net.prefixlen]
        node = 0
        for i, bit in enumerate(bits):
            side = int(bit)
            if i == len(bits) - 1:
                nodes[node][side] = ("data", offset)
            else:
                nxt = nodes[node][side]
                if not (isinstance(nxt, tuple) and nxt[0] == "node"):
                    nodes.append([None, None])
                    nxt = nodes[node][side] = ("node", len(nodes) - 1)
                node = nxt[1]
    count = len(nodes)

    def value(rec: Any) -> int:
        if rec is None:
            return count
        kind, n = rec
        return n if kind == "node" else count + 16 + n

    tree = b"".join(struct.pack(">I", value(l))[1:] + struct.pack(">I", value(r))[1:] for l, r in nodes)
    # libmaxminddb insists on each metadata value's exact type
    meta = (encode_key("node_count") + _uint(6, count) + encode_key("record_size") + _uint(5, 24)
            + encode_key("ip_version") + _uint(5, 4) + encode_key("database_type") + encode(database_type)
            + encode_key("languages") + encode(["en"])
            + encode_key("binary_format_major_version") + _uint(5, 2)
            + encode_key("binary_format_minor_version") + _uint(5, 0)
            + encode_key("build_epoch") + _uint(9, int(time.time()))
            + encode_key("description") + encode({"en": "test database"}))
    with open(path, "wb") as f:
        f.write(tree + b"\0" * 16 + data + b"\xab\xcd\xefMaxMind.com" + _ctrl(7, 9) + meta)


def encode_key(key: str) -> bytes:
    return encode(key)
