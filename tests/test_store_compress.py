"""How stored messages are compressed (mppproxy/store/compress.py): a large
message whose sample gains little from string matching (a base64
attachment) is Huffman-coded, anything else gets zlib level 1, and every
result is one zlib stream that ``zlib.decompress`` reads back whole."""
from __future__ import annotations

import base64
import random
import zlib

from hypothesis import given, settings, strategies as st

from mppproxy.store import compress
from mppproxy.store.compress import (SAMPLE_FROM, SMALL, SMALL_WBITS, ZLIB_LEVEL, compress_message,
                                     huffman_is_enough)

HEAD = (b"From: a@example.org\r\nTo: b@example.com\r\nSubject: report\r\nMIME-Version: 1.0\r\n"
        b"Content-Type: multipart/mixed; boundary=x\r\n\r\n--x\r\n"
        b"Content-Type: text/plain\r\n\r\nThe report is attached.\r\n--x\r\n"
        b"Content-Type: application/pdf\r\nContent-Transfer-Encoding: base64\r\n\r\n")


def attachment_message(size: int, seed: int = 1) -> bytes:
    octets = random.Random(seed).randbytes(size * 3 // 4)
    return HEAD + base64.encodebytes(octets).replace(b"\n", b"\r\n") + b"--x--\r\n"


def text_message(size: int) -> bytes:
    words = [b"quarantine", b"release", b"mail", b"the", b"administrator", b"domain", b"of"]
    rng = random.Random(2)
    body = b" ".join(rng.choice(words) for _ in range(size // 7))
    return HEAD.split(b"--x", 1)[0] + body


def test_large_attachment_is_huffman_coded_and_reads_back() -> None:
    """A 256 KiB message that is mostly a base64 attachment: Huffman
    coding (no slower level-1 matching), about as small, read back whole."""
    data = attachment_message(256 * 1024)
    assert huffman_is_enough(data)
    out = compress_message(data)
    assert out == compress._huffman(data)
    assert zlib.decompress(out) == data
    assert len(out) <= 1.02 * len(zlib.compress(data, ZLIB_LEVEL))


def test_large_text_keeps_level_1() -> None:
    """Large text gains much from string matching: level 1, as before."""
    data = text_message(256 * 1024)
    assert not huffman_is_enough(data)
    out = compress_message(data)
    assert out == zlib.compress(data, ZLIB_LEVEL)
    assert zlib.decompress(out) == data


def test_messages_under_sample_from_are_not_sampled() -> None:
    """From SMALL to SAMPLE_FROM a message gets level 1 at once with
    zlib's defaults, attachment or not."""
    data = attachment_message(SAMPLE_FROM // 2)
    assert SMALL <= len(data) < SAMPLE_FROM
    assert compress_message(data) == zlib.compress(data, ZLIB_LEVEL)


def _window_bits(stream: bytes) -> int:
    # RFC 1950 2.2: CINFO, the high nibble of CMF, is log2(window) - 8.
    return (stream[0] >> 4) + 8


def test_small_messages_get_the_small_compressor() -> None:
    """A message under SMALL is level 1 with the 8 KiB window (its
    stream's header says so), as small as with zlib's defaults give or
    within 1 %, and reads back with a plain zlib.decompress; from SMALL
    on the window is zlib's default again."""
    for data in (text_message(4096), attachment_message(4096), text_message(SMALL)[:SMALL - 1]):
        assert len(data) < SMALL
        out = compress_message(data)
        assert _window_bits(out) == SMALL_WBITS
        assert zlib.decompress(out) == data
        assert len(out) <= 1.01 * len(zlib.compress(data, ZLIB_LEVEL))
    big = text_message(SMALL + 1000)
    assert _window_bits(compress_message(big)) == zlib.MAX_WBITS


@settings(max_examples=60, deadline=None)
@given(st.binary(min_size=0, max_size=3 * SAMPLE_FROM))
def test_any_octets_read_back(data: bytes) -> None:
    """Whatever a message holds, its stored form decompresses to it."""
    assert zlib.decompress(compress_message(data)) == data
