"""The lines of a log chunk that hold any of a few literal anchors, found in one pass.

The parser (logparse.py) runs its exact recognisers only on the lines an anchor hits (``loss``,
each other metric name, ``issing``, ...): finding those lines is most of what reading a quiet
log costs. ``line_ends(region, start, limit)`` gives the end of each such line, in order.

With Hyperscan (Intel's multi-pattern matcher, the ``hyperscan`` wheel) one scan finds every
anchor at once, SIMD-fast, and reports one match per line: the pattern
``(?:a1|a2|...)[^\\r\\n]*[\\r\\n]`` ends at the line's terminator, and Hyperscan reports a
pattern's matches once per end offset, in increasing order (Hyperscan Developer Reference,
"Scanning for Patterns"; its Rose engine's catch-up delivers block-mode matches in order). A
last line without terminator is a second pattern ending in ``\\z``; lines that hold one of the
``marked`` anchors (the parser's checkpoint-report words) are a second pair of patterns, so the
parser looks for those forms only on their lines. Without the wheel (a platform it has none
for), one ``bytes.find`` per anchor, merged, finds the same lines.

``limit`` bounds the list a call returns (a hostile chunk of 16 MiB of ``loss\\n`` lines must
not become millions of Python ints at once): the caller resumes after the last line it parsed.
"""

from __future__ import annotations

import functools
import logging
import threading
from itertools import pairwise

try:
    import hyperscan
except ImportError:  # no wheel for this platform: the bytes.find merge below
    hyperscan = None

LIMIT = 4096  # line ends per call
log = logging.getLogger("orchd.linefind")


@functools.lru_cache(maxsize=64)
def finder(anchors: tuple[bytes, ...], marked: tuple[bytes, ...] = ()) -> LineFinder:
    """The finder for these anchors (cached: each tick builds a parser per job): Hyperscan's, or
    the ``bytes.find`` merge without the wheel or should Hyperscan refuse to compile them.
    ``marked``: anchors (among ``anchors``) whose lines are also reported apart."""
    if hyperscan is not None:
        try:
            return HyperscanLines(anchors, marked)
        except hyperscan.error as e:  # (never seen: every byte of an anchor is escaped)
            log.warning("hyperscan cannot compile the anchors %r (%s): finding lines with bytes.find", anchors, e)
    return FindLines(anchors, marked)


class FindLines:
    """Lines hit by ``anchors``, one ``bytes.find`` per anchor merged in order (the fallback)."""

    def __init__(self, anchors: tuple[bytes, ...], marked: tuple[bytes, ...] = ()):
        self.anchors, self.marked = anchors, frozenset(marked)

    def line_ends(self, region: bytes, start: int, limit: int = LIMIT) -> tuple[list[int], set[int]]:
        """(ends, marked ends): the offsets in ``region`` of the terminator (``\\r`` or ``\\n``;
        ``len(region)`` for a last line without one) of each line at or after ``start`` that holds
        an anchor, ascending, at most ``limit`` of them; and which of those lines hold a marked
        anchor. ``start`` must be a line's start or a terminator's offset."""
        find, size, ends, marked = region.find, len(region), [], set()
        nxt = [[i, a] for a in self.anchors if (i := find(a, start)) >= 0]  # [next hit, anchor]
        while nxt and len(ends) < limit:
            at = min(nxt)[0]
            b = find(b"\n", at)  # the line's end: two finds cost less than a search for [\r\n]
            b = size if b < 0 else b
            if (r := find(b"\r", at, b)) >= 0:
                b = r
            ends.append(b)
            for hit in nxt:  # each anchor searched again only once past its last hit
                if hit[0] < b:
                    if hit[1] in self.marked:
                        marked.add(b)
                    hit[0] = find(hit[1], b)
            if min(nxt)[0] < 0:
                nxt = [hit for hit in nxt if hit[0] >= 0]
        return ends, marked


class HyperscanLines:
    """Lines hit by ``anchors``, found by one Hyperscan block-mode scan (see the module doc).
    A scratch space per thread: Hyperscan's may serve one scan at a time."""

    def __init__(self, anchors: tuple[bytes, ...], marked: tuple[bytes, ...] = ()):
        expressions = []
        for group in (anchors, marked) if marked else (anchors,):  # ids 0, 1: any anchor; 2, 3: marked
            alternatives = b"(?:" + b"|".join(_escape(a) for a in group) + b")"
            expressions += [alternatives + rb"[^\r\n]*[\r\n]", alternatives + rb"[^\r\n]*\z"]
        self.db = hyperscan.Database(mode=hyperscan.HS_MODE_BLOCK)
        self.db.compile(expressions=expressions, ids=list(range(len(expressions))), elements=len(expressions),
                        flags=0)
        self._local = threading.local()

    def line_ends(self, region: bytes, start: int, limit: int = LIMIT) -> tuple[list[int], set[int]]:
        """As FindLines.line_ends."""
        scratch = getattr(self._local, "scratch", None)
        if scratch is None:
            scratch = self._local.scratch = hyperscan.Scratch(self.db)
        ends: list[int] = []
        marked: set[int] = set()
        add, mark = ends.append, marked.add

        def on_match(pattern: int, _from: int, to: int, _flags: int, _context: object) -> bool:
            end = start + to - 1 + (pattern & 1)  # even ids end past the terminator, odd ones at the end
            if pattern < 2:
                add(end)  # halted one line past the limit: every match of the lines kept came before it
                return len(ends) > limit  # (True halts the scan)
            mark(end)
            return False

        try:
            self.db.scan(memoryview(region)[start:] if start else region, match_event_handler=on_match,
                         scratch=scratch)
        except hyperscan.ScanTerminated:  # (halted past the limit)
            pass
        if any(b <= a for a, b in pairwise(ends)):  # never seen: the order is documented
            ends = sorted(set(ends))
        return ends[:limit], marked


def _escape(literal: bytes) -> bytes:
    """``literal`` as a Hyperscan (PCRE syntax) pattern: every byte outside [A-Za-z0-9_] as \\xHH."""
    return b"".join(bytes([c]) if chr(c).isascii() and (chr(c).isalnum() or c == 95) else b"\\x%02x" % c
                    for c in literal)


LineFinder = FindLines | HyperscanLines
