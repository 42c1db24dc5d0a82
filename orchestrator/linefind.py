"""The lines of a log chunk that hold any of a few literal anchors, found in one pass.

The parser (logparse.py) runs its exact recognisers only on the lines an anchor hits (``loss``,
each other metric name, ``issing``, ...): finding those lines is most of what reading a quiet
log costs. ``line_ends(region, start, stop, limit)`` gives the end of each such line, in order,
and, in the same pass, the lines that hold a watched text (a retry trigger such as ``NCCL
error``, reported whole by the parser).

With Hyperscan (Intel's multi-pattern matcher, the ``hyperscan`` wheel) one scan finds every
anchor at once, SIMD-fast, and reports one match per line: the pattern
``(?:a1|a2|...)[^\\r\\n]*[\\r\\n]`` ends at the line's terminator, and Hyperscan reports a
pattern's matches once per end offset, in increasing order (Hyperscan Developer Reference,
"Scanning for Patterns"; its Rose engine's catch-up delivers block-mode matches in order). A
last line without terminator is a second pattern ending in ``\\z``; lines that hold one of the
``marked`` anchors (the parser's checkpoint-report words) are a second pair of patterns, so the
parser looks for those forms only on their lines, and each watched text is a pair more.
Without the wheel (a platform it has none for), one ``bytes.find`` per literal, merged, finds
the same lines.

``limit`` bounds the list a call returns (a hostile chunk of 16 MiB of ``loss\\n`` lines must
not become millions of Python ints at once): the caller resumes after the last line it parsed.
"""

from __future__ import annotations

import functools
import logging
import threading
from itertools import islice
from typing import NamedTuple

try:
    import hyperscan
except ImportError:  # no wheel for this platform: the bytes.find merge below
    hyperscan = None

LIMIT = 4096  # line ends per call
log = logging.getLogger("orchd.linefind")


class Lines(NamedTuple):
    """What ``line_ends`` found: the terminator's offset (``\\r`` or ``\\n``; ``stop`` for a last
    line without one) of each line that holds an anchor, ascending, at most ``limit``; which of
    those hold a marked anchor (a finder may also name lines past the last it returns); and
    (end, index in ``watched``) of each line that holds a watched text, in order of end, up to
    the last of ``ends`` when the limit cut the list short (the caller resumes from there)."""

    ends: list[int]
    marked: set[int]
    watched: list[tuple[int, int]]


@functools.lru_cache(maxsize=64)
def finder(anchors: tuple[bytes, ...], marked: tuple[bytes, ...] = (), watched: tuple[bytes, ...] = ()) -> LineFinder:
    """The finder for these anchors (cached: each tick builds a parser per job): Hyperscan's, or
    the ``bytes.find`` merge without the wheel or should Hyperscan refuse to compile them.
    ``marked``: anchors (among ``anchors``) whose lines are also reported apart; ``watched``:
    texts whose lines are reported apart, whether or not an anchor is on them."""
    if hyperscan is not None:
        try:
            return HyperscanLines(anchors, marked, watched)
        except hyperscan.error as e:  # (never seen: every byte of a literal is escaped)
            log.warning("hyperscan cannot compile the anchors %r (%s): finding lines with bytes.find", anchors, e)
    return FindLines(anchors, marked, watched)


class FindLines:
    """Lines hit by ``anchors`` (and ``watched``), one ``bytes.find`` per literal merged in order
    (the fallback)."""

    def __init__(self, anchors: tuple[bytes, ...], marked: tuple[bytes, ...] = (), watched: tuple[bytes, ...] = ()):
        self.anchors, self.marked, self.watched = anchors, frozenset(marked), watched

    def line_ends(self, region: bytes, start: int, stop: int | None = None, limit: int = LIMIT) -> Lines:
        """The lines of ``region[:stop]`` (all of it by default) at or after ``start`` hit by the
        literals, as ``Lines`` says. ``start`` must be a line's start or a terminator's offset,
        ``stop`` a terminator's offset plus one, or the region's end."""
        find, stop = region.find, len(region) if stop is None else stop
        ends: list[int] = []
        marked: set[int] = set()
        watched: list[tuple[int, int]] = []
        literals = [(a, -1) for a in self.anchors] + [(w, k) for k, w in enumerate(self.watched)]
        nxt = [[i, a, k] for a, k in literals if (i := find(a, start, stop)) >= 0]  # [next hit, literal, watch index]
        while nxt and len(ends) < limit:
            at = min(nxt)[0]
            b = find(b"\n", at, stop)  # the line's end: two finds cost less than a search for [\r\n]
            b = stop if b < 0 else b
            if (r := find(b"\r", at, b)) >= 0:
                b = r
            anchored = False
            for hit in nxt:  # each literal searched again only once past its last hit
                if hit[0] < b:
                    if hit[2] >= 0:
                        watched.append((b, hit[2]))
                    else:
                        anchored = True
                        if hit[1] in self.marked:
                            marked.add(b)
                    hit[0] = find(hit[1], b, stop)
            if anchored:
                ends.append(b)
            if min(nxt)[0] < 0:
                nxt = [hit for hit in nxt if hit[0] >= 0]
        watched.sort()
        return Lines(ends, marked, watched)


class HyperscanLines:
    """Lines hit by ``anchors``, found by one Hyperscan block-mode scan (see the module doc).
    A scratch space per thread: Hyperscan's may serve one scan at a time."""

    def __init__(self, anchors: tuple[bytes, ...], marked: tuple[bytes, ...] = (), watched: tuple[bytes, ...] = ()):
        expressions, ids = [], []
        # ids 0, 1: any anchor; 2, 3: a marked one; 4 + 2k, 5 + 2k: watched text k
        for first, group in [(0, anchors), (2, marked), *((4 + 2 * k, (w,)) for k, w in enumerate(watched))]:
            if group:
                alternatives = b"(?:" + b"|".join(_escape(a) for a in group) + b")"
                expressions += [alternatives + rb"[^\r\n]*[\r\n]", alternatives + rb"[^\r\n]*\z"]
                ids += [first, first + 1]
        self.db = hyperscan.Database(mode=hyperscan.HS_MODE_BLOCK)
        self.db.compile(expressions=expressions, ids=ids, elements=len(expressions), flags=0)
        self._local = threading.local()

    def line_ends(self, region: bytes, start: int, stop: int | None = None, limit: int = LIMIT) -> Lines:
        """As FindLines.line_ends."""
        scratch = getattr(self._local, "scratch", None)
        if scratch is None:
            scratch = self._local.scratch = hyperscan.Scratch(self.db)
        ends: list[int] = []
        marked: set[int] = set()
        watched: list[tuple[int, int]] = []
        add, mark, watch = ends.append, marked.add, watched.append

        def on_match(pattern: int, _from: int, to: int, _flags: int, _context: object) -> bool:
            end = start + to - 1 + (pattern & 1)  # even ids end past the terminator, odd ones at the end
            if pattern < 2:
                add(end)  # halted one line past the limit: every match of the lines kept came before it
                return len(ends) > limit  # (True halts the scan)
            if pattern < 4:
                mark(end)
            else:
                watch((end, (pattern - 4) >> 1))
            return False

        view = region if start == 0 and stop is None else memoryview(region)[start:stop]
        try:
            self.db.scan(view, match_event_handler=on_match, scratch=scratch)
        except hyperscan.ScanTerminated:  # (halted past the limit)
            pass
        if not all(map(int.__lt__, ends, islice(ends, 1, None))):  # never seen: the order is documented
            ends = sorted(set(ends))
        if len(ends) >= limit:  # the caller resumes after the last line returned
            ends = ends[:limit]
            watched = [w for w in watched if w[0] <= ends[-1]]
        watched.sort()  # (lines with two texts: the order of matches at one offset is not documented)
        return Lines(ends, marked, watched)


def _escape(literal: bytes) -> bytes:
    """``literal`` as a Hyperscan (PCRE syntax) pattern: every byte outside [A-Za-z0-9_] as \\xHH."""
    return b"".join(bytes([c]) if chr(c).isascii() and (chr(c).isalnum() or c == 95) else b"\\x%02x" % c
                    for c in literal)


LineFinder = FindLines | HyperscanLines
