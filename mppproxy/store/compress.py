"""How a stored message is compressed (floor 1, beside ``store.py``): one
zlib stream (RFC 1950), which ``zlib.decompress`` reads whatever strategy
wrote it, so rows stored before and after any change here read the same.

zlib at level 1 ("ZLIB_LEVEL"): text mail keeps ~26 % of its size at
153 MB/s, against ~23 % at 72 MB/s at level 6.  A base64 attachment, most
of a large message's octets, is another matter: its 64 symbols give
deflate's string matching little to find, and level 1 crawls through it
at ~37 MB/s (7 ms for a 256 KiB message, on the writer's thread for every
copy: the archive benchmark's 256 KiB copies/s) to keep 77 %.  Huffman
coding alone (``Z_HUFFMAN_ONLY``) keeps 76 % of it at ~125 MB/s.

So a large message is sampled first: 16 KiB from its middle (past the
header section and a text part, in an attachment when there is one),
compressed both ways.  When string matching gains less than
``MATCHING_WORTH`` over Huffman coding on the sample, the whole message is
Huffman-coded; otherwise (text, HTML, anything repetitive) it gets level 1.
The sample costs ~0.5 ms of a 256 KiB message's 2-7 ms.  Messages under
``SAMPLE_FROM`` are compressed at level 1 at once: fast whatever they hold.

A small message (under ``SMALL``, most mail) gets a smaller compressor:
an 8 KiB window and hash (``SMALL_WBITS``, ``SMALL_MEMLEVEL``).  zlib's
defaults (a 32 KiB window, memLevel 8) make deflate's state ~256 KiB,
above glibc malloc's 128 KiB mmap threshold, so every message paid for
fresh pages zeroed and faulted in: ~35 us, more than compressing 4 KiB
(an empty ``zlib.compress`` cost 38 us).  The small state (~64 KiB) comes
from the heap: 4 KiB of text in 27 us instead of 62, 1 KiB in 11 instead
of 45, within 0.2 % of the size (the window still spans the message).
The stream's header names its window; ``zlib.decompress`` reads any.
"""
from __future__ import annotations

import zlib

ZLIB_LEVEL = 1
# From this size a message is sampled (below it level 1 costs little).
SAMPLE_FROM = 64 * 1024
SAMPLE = 16 * 1024
# Under this size the small compressor (8 KiB window, memLevel 6); from
# 16 KiB on it was no faster and its window cost 1-2 % of the size.
SMALL = 12 * 1024
SMALL_WBITS = 13
SMALL_MEMLEVEL = 6
# Level 1 must come out this much smaller than Huffman coding on the
# sample to be worth its time on the whole message.
MATCHING_WORTH = 0.95


def compress_message(data: bytes) -> bytes:
    """``data`` as one zlib stream (see the module's text)."""
    if len(data) < SMALL:
        compressor = zlib.compressobj(ZLIB_LEVEL, zlib.DEFLATED, SMALL_WBITS, SMALL_MEMLEVEL)
        return compressor.compress(data) + compressor.flush()
    if len(data) < SAMPLE_FROM or not huffman_is_enough(data):
        return zlib.compress(data, ZLIB_LEVEL)
    return _huffman(data)


def huffman_is_enough(data: bytes) -> bool:
    """Whether string matching gains too little on a sample of ``data``
    to be worth its time."""
    middle = len(data) // 2
    sample = data[max(0, middle - SAMPLE // 2):middle + SAMPLE // 2]
    matched = len(zlib.compress(sample, ZLIB_LEVEL))
    return matched >= MATCHING_WORTH * len(_huffman(sample))


def _huffman(data: bytes) -> bytes:
    compressor = zlib.compressobj(ZLIB_LEVEL, zlib.DEFLATED, zlib.MAX_WBITS,
                                  zlib.DEF_MEM_LEVEL, zlib.Z_HUFFMAN_ONLY)
    return compressor.compress(data) + compressor.flush()
