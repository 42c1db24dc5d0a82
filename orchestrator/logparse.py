"""Incremental parsing of training logs into metric samples and checkpoint-loading reports.

``LogParser.feed(data, offset)`` takes the bytes of a log that follow ``offset`` and returns the
events found in its complete lines, plus how many bytes it consumed; the caller stores
``offset + consumed`` and the parser's small ``state`` and feeds the next bytes next tick. A
partial last line is not consumed (it is read again, whole, next time). ``\\r`` ends a line as
``\\n`` does, so progress-bar refreshes are lines. Memory is bounded by the size of ``data``: a
line longer than ``max_line`` bytes is skipped, and bytes need not be valid UTF-8.

Recognised without configuration (metric names from the spec, plus aliases such as the HF
Trainer's ``eval_loss`` for ``val_loss``):

* ``name=1.5``, ``name: 1.5``, ``'name': 1.5``, ``"name": "1.5"`` (Python/JSON dicts, the HF
  Trainer's log lines), tqdm / Lightning progress-bar postfixes (``..., val_loss=0.239]``),
  ``tensor(1.5)``; ``nan``, ``inf``, ``-inf``;
* the step (``step 25``, ``global_step=25``, ``'step': 25``) and epoch (``Epoch 2:``,
  ``'epoch': '1.5'``) on the same line, else the last one seen;
* PyTorch ``load_state_dict(strict=False)``'s ``_IncompatibleKeys(missing_keys=[...],
  unexpected_keys=[...])``; its strict error ``Missing key(s) in state_dict: "a", "b".``; the
  HF Transformers warnings ``... newly initialized: [...]`` / ``... were not used when
  initializing ...: [...]``; and a count line (``Missing keys: 2``) followed by ``- name`` lines.

Speed: the lines any anchor hits (``loss`` finds every ``*_loss`` name, plus each other metric
name, ``issing key``, ``nexpected_key``, ``Some weights of``, ...) and the lines with a watched
text (retry log triggers) are found in one pass (linefind.py: Hyperscan, else a ``bytes.find``
per literal); one alternation of all recognisers in ``re`` ran at 40 MB/s, because its first
bytes are common letters. Only those lines are parsed, whole, so the step or epoch is read
from lines that carry a metric (else the last one seen carries over). The recognisers of a
metric line, and the recording of its samples, run in C (_linescan.c, ~1 us a line, samples
included) where it was built, else as the regexes below (~6 us). User monitors are one more ``finditer`` each.
"""

from __future__ import annotations

import functools
import hashlib
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from orchestrator import linefind

try:  # the recogniser below, compiled (setup.py builds it where a C compiler is at hand)
    from orchestrator import _linescan
except ImportError:
    _linescan = None

ALIASES: dict[str, tuple[str, ...]] = {
    "val_loss": ("eval_loss", "val/loss", "valid_loss", "validation_loss"),
    "train_loss": ("train/loss", "loss"),
}
MAX_LINE = 1 << 20  # bytes; a longer line is skipped whole
TAIL = 64  # bytes: the end of what was consumed, remembered by its hash (ParserState.tail)


def tail_mark(tail: bytes) -> tuple[int, str]:
    """(len(tail), a 64-bit BLAKE2b of it in hex): what logread.read_new checks the bytes before
    the offset against (a hash: the database keeps no log text for it)."""
    return len(tail), hashlib.blake2b(tail, digest_size=8).hexdigest()

_NUM = rb"[-+]?(?:\d+(?:\.\d*)?(?:[eE][-+]?\d+)?|\.\d+(?:[eE][-+]?\d+)?|[Nn]a[Nn]|NAN|[Ii]nf(?:inity)?|INF)"
_LIST = rb"[^\]\r\n]*"


def _words(*words: bytes) -> bytes:
    """``(?<![\\w/.])['"]?(?:w1|w2|...)`` (a word, maybe quoted, not the tail of a longer word),
    written so that every alternative starts with a literal byte and the lookbehind comes after
    it: ``re`` then skips to the bytes that can start a match instead of trying every position
    (2x faster on a metric line)."""
    branches = []
    for w in words:
        branches.append(re.escape(w[:1]) + rb"(?<![\w/.].)" + re.escape(w[1:]))
        branches += [q + rb"(?<![\w/.].)" + re.escape(w) for q in (b"'", b'"')]
    return rb"(?:" + b"|".join(branches) + rb")"


_STEP = re.compile(_words(b"global_step", b"step", b"Step", b"iteration", b"iter") +
                   rb"['\"]?[ \t]*[=: ][ \t]*['\"]?(\d+)(?:/(\d+))?")  # "step 43/311": the total too
_TQDM = re.compile(rb"(?<![\w/.])(\d+)/(\d+) \[")  # tqdm's "| 43/311 [00:10<01:02, 4.3it/s, loss=0.3]"
_EPOCH = re.compile(_words(b"epoch", b"Epoch") + rb"['\"]?[ \t]*[=: ][ \t]*['\"]?(\d+(?:\.\d+)?)")
_INC = re.compile(rb"_IncompatibleKeys\(missing_keys=\[(" + _LIST + rb")\], unexpected_keys=\[(" + _LIST + rb")\]\)")
_STRICT = re.compile(rb"(Missing|Unexpected) key\(s\) in state_dict: ([^\r\n]*)")
_COUNT = re.compile(rb"([Mm]issing|[Uu]nexpected)[ _]keys?[ \t]*[:=(]?[ \t]*(\d+)\)?[ \t]*:?[ \t]*$")
_HF = re.compile(rb"(newly initialized|were not used when initializing [^:\r\n]*): \[(" + _LIST + rb")\]")
# literal anchors of the checkpoint-loading forms: every form contains one of these (_INC, _STRICT
# and _COUNT a "[Mm]issing[ _]key" or "[Uu]nexpected[ _]key", _HF "Some weights of"); the longer
# the literals, the fewer false starts in Hyperscan's scan (6 bytes instead of 10: 30 % slower)
_KEY_ANCHORS = (b"issing key", b"issing_key", b"nexpected key", b"nexpected_key", b"Some weights of")


_SEP = re.compile(rb"[\r\n]")
_DASH_LINE = re.compile(rb"[ \t]*[-*][ \t]+['\"]?([\w.\-/:]+)['\"]?[ \t]*(?:\r\n|[\r\n])")
_QUOTED = re.compile(rb"['\"]([^'\"]+)['\"]")


class MetricSample(NamedTuple):
    """A metric value logged at ``step`` / ``epoch`` (None if unknown); ``offset`` of its line.
    A NamedTuple, not a frozen dataclass: a chatty log makes 10^5 a second (4x cheaper to build)."""

    name: str
    value: float
    step: int | None
    epoch: float | None
    offset: int


@dataclass(frozen=True)
class KeysReport:
    """A checkpoint-loading report: ``kind`` is "missing" or "unexpected"; ``count`` may exceed
    ``len(keys)`` when the log gave only a count."""

    kind: str
    keys: tuple[str, ...]
    count: int
    offset: int


@dataclass(frozen=True)
class PatternHit:
    """A line containing a watched text (a retry trigger or a flag-only monitor)."""

    name: str
    line: str
    offset: int


Event = MetricSample | KeysReport | PatternHit


@dataclass
class ParserState:
    """What must survive between feeds (and ticks): JSON-serialisable via ``to_dict``."""

    step: int | None = None
    epoch: float | None = None
    total: int | None = None               # the run's total steps, when its log says (step N/T, tqdm)
    skipping: bool = False                 # inside an over-long line
    pending: list[Any] | None = None       # [kind, count, [names...], offset] of a count + "- name" list
    # name -> (step, epoch, value) last recorded; a NaN or infinity as its text ("nan", "inf",
    # "-inf"): JSON has none, and NaN equals nothing, not even the NaN a progress bar repeats
    last: dict[str, tuple[Any, ...]] = field(default_factory=dict)
    tail: tuple[int, str] | None = None    # (n, hash) of the last n bytes consumed (logread: a log rewritten in place)

    def to_dict(self) -> dict[str, Any]:
        return {"step": self.step, "epoch": self.epoch, "total": self.total, "skipping": self.skipping,
                "pending": self.pending, "last": self.last, "tail": self.tail}

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> ParserState:
        d = dict(d or {})
        d["last"] = {k: _last_key(*v) for k, v in d.get("last", {}).items()}  # JSON gave lists
        if d.get("tail") is not None:
            d["tail"] = tuple(d["tail"])
        return cls(**d)


def _last_key(step: Any, epoch: Any, value: Any) -> tuple[Any, ...]:
    """A stored ParserState.last entry as the parser keys it now: states written before orchd
    keyed non-finite values by text held a NaN as None (json.dumps's) and an infinity as a float."""
    if value is None:
        value = "nan"
    elif isinstance(value, float) and not math.isfinite(value):
        value = str(value)
    return step, epoch, value


def _line_start(region: bytes, at: int, lo: int) -> int:
    """Where the line holding ``at`` starts, looking back no further than ``lo`` (a known line
    start or bound): an unbounded ``rfind`` of a separator the chunk lacks (``\\r`` in most logs)
    scans back to the chunk's start for every hit, quadratic in the chunk (80 s for 20 MB)."""
    return max(region.rfind(b"\n", lo, at), region.rfind(b"\r", lo, at), lo - 1) + 1


def _names(blob: bytes) -> tuple[str, ...]:
    return tuple(n.decode("utf-8", "replace") for n in _QUOTED.findall(blob))


INT64_MAX = 2**63 - 1


def _int(raw: bytes) -> int | None:
    """A step or count from a log: None when it is not a number or does not fit the database's
    64-bit integers (a hostile or garbled log must not break the tick)."""
    try:
        v = int(raw)
    except ValueError:
        return None
    return v if -INT64_MAX <= v <= INT64_MAX else None


def _float(raw: bytes) -> float:
    try:
        return float(raw)
    except ValueError:  # "Infinity" etc. are fine for float(); anything else is garbled
        return float("nan")


class _Compiled(NamedTuple):
    keys: tuple[bytes, ...]     # metric names and aliases, longest first (the kv pattern's order)
    names: tuple[str, ...]      # the metric each of ``keys`` records
    kv: re.Pattern[bytes]       # (key, value) pairs
    anchors: tuple[bytes, ...]  # literals, one of which is on every line a recogniser reads
    index: dict[bytes, int]     # position of each of ``keys``


@functools.lru_cache(maxsize=256)
def _compiled(metrics: tuple[str, ...]) -> _Compiled:
    """The recognisers of these metrics; cached because every tick builds a parser per job."""
    alias_of: dict[bytes, str] = {}
    for name in metrics:
        alias_of[name.encode()] = name
        for alias in ALIASES.get(name, ()):
            alias_of.setdefault(alias.encode(), name)
    # "the name is not the tail of a longer word" is checked after each name's first byte: a
    # pattern that starts with a lookbehind is tried at every position, one whose alternatives all
    # start with a literal skips to the next byte that can start a name (40 % less per line)
    keys = tuple(sorted(alias_of, key=len, reverse=True))
    alternatives = b"|".join(re.escape(n[:1]) + rb"(?<![\w/.].)" + re.escape(n[1:]) for n in keys)
    kv = re.compile(rb"(" + alternatives + rb")['\"]?[ \t]*[=:][ \t]*['\"]?(?:tensor\()?(" + _NUM + rb")")
    anchors = {b"loss" if b"loss" in n else n for n in alias_of} | set(_KEY_ANCHORS)
    return _Compiled(keys, tuple(alias_of[k] for k in keys), kv, tuple(sorted(anchors)),
                     {k: i for i, k in enumerate(keys)})


class LogParser:
    """Turns log bytes into events for the given metric names.

    ``metrics``: names to record (aliases added); ``monitors``: (name, regex) pairs, a regex with
    a ``value`` group records metric ``name``, else each matching line is a PatternHit;
    ``watch``: (name, text) pairs reported as PatternHit when a line contains ``text``.
    """

    def __init__(self, metrics: Iterable[str], monitors: Iterable[tuple[str, str]] = (),
                 watch: Iterable[tuple[str, str]] = (), state: ParserState | None = None,
                 max_line: int = MAX_LINE):
        self.recognisers = _compiled(tuple(metrics))
        self.monitors = [(n, re.compile(r.encode())) for n, r in monitors]
        self.watch = [(n, t.encode()) for n, t in watch]
        self.lines = linefind.finder(self.recognisers.anchors, _KEY_ANCHORS, tuple(t for _, t in self.watch))
        self.state = state or ParserState()
        self.max_line = max_line

    # ------------------------------------------------------------------ public

    def feed(self, data: bytes, offset: int, final: bool = False, skip: int = 0) -> tuple[list[Event], int]:
        """Parse the complete lines of ``data[skip:]``, the log's bytes from ``offset`` on
        (``data[:skip]``: bytes before them, read with them by logread.read_new to check the
        log was not rewritten, and not parsed: a slice would copy the megabytes of a chunk).

        Returns (events, consumed bytes from ``offset``). With ``final`` (the writer has exited) a
        last unterminated line is parsed too and any pending key list is flushed. The state keeps a
        hash of the last bytes consumed (``tail``).
        """
        events, end = self._feed(data, offset - skip, final, skip)
        if end > skip:
            self.state.tail = tail_mark(data[max(skip, end - TAIL):end])
        return events, end - skip

    def _feed(self, data: bytes, offset: int, final: bool, start: int) -> tuple[list[Event], int]:
        """The events of data[start:] (``offset``: the log offset of data[0]) and where in ``data``
        the consumed bytes end."""
        events: list[Event] = []
        if self.state.skipping:
            m = _SEP.search(data, start)
            if not m:
                return events, len(data)
            start = m.end()
            self.state.skipping = False
        end = max(data.rfind(b"\n", start), data.rfind(b"\r", start)) + 1
        if final:
            end = len(data)
        elif end <= start:  # no complete line
            if len(data) - start >= self.max_line:
                self.state.skipping = True
                return events, len(data)
            return events, start
        self._scan(data, start, end, offset, events)
        if self.monitors:  # (on a copy: a user's ^ and \A match at its start, as they always have)
            region = data[start:end]
            for name, rx in self.monitors:
                for m in rx.finditer(region):
                    self._monitor_hit(name, m, region, offset + start, events)
        if final and self.state.pending:
            self._flush_pending(events)
        return events, end

    # ------------------------------------------------------------------ internals

    def _scan(self, region: bytes, start: int, size: int, base: int, events: list[Event]) -> None:
        """The lines of region[start:size] (``base``: the log offset of region[0]); not copied, a
        chunk is megabytes."""
        done = self._collect_dashes(region, start, size, events) if self.state.pending else start
        rfind, line_ends, limit = region.rfind, self.lines.line_ends, linefind.LIMIT
        keys, names, st = self.recognisers.keys, self.recognisers.names, self.state
        compiled = _linescan.scan if _linescan is not None and len(keys) <= 64 else None
        watched: list[tuple[int, int]] = []
        resume = start  # where the finder goes on; ``done``: lines before it were parsed (or belong to a key list)
        while True:  # the lines an anchor hits, a bounded list at a time
            ends, keyed, watch = line_ends(region, resume, size, limit)  # (keyed: with a checkpoint-report word)
            watched += watch
            i, count = 0, len(ends)
            while i < count:
                if compiled is not None:  # the lines up to the next keyed one, in C
                    i, done, (st.step, st.total, st.epoch) = compiled(
                        region, ends, i, done, keyed, keys, names, base, (st.step, st.total, st.epoch), st.last,
                        events, MetricSample)
                    if i == count:
                        break
                b = ends[i]
                i += 1
                if b < done:  # a "- name" line of a key list, consumed with it
                    continue
                a = max(rfind(b"\n", done, b), rfind(b"\r", done, b), done - 1) + 1  # (_line_start, inlined)
                if self._line(region[a:b], a, base, events, b in keyed):  # a count line: "- name" lines follow
                    done = self._collect_dashes(region, min(b + 1, size), size, events)
                else:
                    done = b
            if count < limit:
                break
            resume = ends[-1]  # (not done: the watched lines among a key list's are still to come)
        for k, (name, _) in enumerate(self.watch):  # the lines with a watched text, watch by watch
            lo = start
            for b, _ in filter(lambda hit: hit[1] == k, watched):
                a = _line_start(region, b, lo)
                events.append(PatternHit(name, region[a:min(b, a + 500)].decode("utf-8", "replace"), base + a))
                lo = b

    def recognise(self, line: bytes) -> tuple[int, int | None, int | None, float | None,
                                               tuple[tuple[int, float], ...]] | None:
        """What a line says (_linescan.c does the same in C): (kind, step, total, epoch, pairs),
        or None without a metric value. ``pairs``: (index in ``recognisers.keys``, value); kind 0
        leaves the step and total as they were, 1 sets the step, 2 and 3 (tqdm's ``43/311 [``)
        the step and total; ``epoch`` None leaves it as it was. The step and epoch are read
        only on a line with a value."""
        metrics = self.recognisers.kv.findall(line)
        if not metrics:
            return None
        kind, step, total, epoch = 0, None, None, None
        if b"tep" in line and (m := _STEP.search(line)):
            kind, step = 1, _int(m[1])
            if m[2]:
                kind, total = 2, _int(m[2])
        elif b"/" in line and b"poch" not in line and (m := _TQDM.search(line)):
            kind, step, total = 3, _int(m[1]), _int(m[2])  # (under "Epoch N:" tqdm counts within the epoch)
        if b"poch" in line and (m := _EPOCH.search(line)):
            epoch = float(m[1])
        index = self.recognisers.index
        return kind, step, total, epoch, tuple((index[k], _float(v)) for k, v in metrics)

    def _record(self, lines: list[tuple[Any, ...]], base: int, events: list[Event]) -> None:
        """Samples from recognised lines, (line start, *recognise(line)) each, in order: the step and
        epoch carried over, a sample dropped when it repeats the last one of its metric (with the
        same step and epoch: a progress bar's refreshes)."""
        st, names, last, new = self.state, self.recognisers.names, self.state.last, tuple.__new__
        isfinite = math.isfinite
        for a, kind, step, total, epoch, pairs in lines:
            if kind:
                st.step = step
                if kind > 1:
                    st.total = total
            if epoch is not None:
                st.epoch = epoch
            step, epoch, at = st.step, st.epoch, base + a
            for k, value in pairs:
                name = names[k]
                key = (step, epoch, value if isfinite(value) else str(value))  # (see ParserState.last)
                if last.get(name) != key:
                    last[name] = key
                    events.append(new(MetricSample, (name, value, step, epoch, at)))

    def _line(self, line: bytes, a: int, base: int, events: list[Event], keyed: bool) -> bool:
        """Parse one line an anchor hit, ``a`` bytes into the region (``keyed``: it holds one of
        _KEY_ANCHORS). Returns True if it opened a count + "- name" key list."""
        st, at = self.state, base + a
        recognised = self.recognise(line)
        if recognised is not None:
            self._record([(a, *recognised)], base, events)
        metrics = recognised is not None
        if not keyed:
            return False
        if m := _INC.search(line):
            for kind, blob in (("missing", m[1]), ("unexpected", m[2])):
                keys = _names(blob)
                events.append(KeysReport(kind, keys, len(keys), at))
        elif m := _STRICT.search(line):
            keys = _names(m[2])
            events.append(KeysReport(m[1].decode().lower(), keys, len(keys), at))
        elif m := _HF.search(line):
            keys = _names(m[2])
            events.append(KeysReport("missing" if m[1] == b"newly initialized" else "unexpected", keys, len(keys),
                                     at))
        elif not metrics and (m := _COUNT.search(line)):
            st.pending = [m[1].decode().lower(), min(_int(m[2]) or 0, 1_000_000), [], at]
            return True
        return False

    def _record_sample(self, sample: MetricSample, events: list[Event]) -> None:
        """Append unless it repeats the last sample of that metric (progress-bar refreshes)."""
        v = sample.value
        key = (sample.step, sample.epoch, v if math.isfinite(v) else str(v))
        if self.state.last.get(sample.name) == key:
            return
        self.state.last[sample.name] = key
        events.append(sample)

    def _collect_dashes(self, region: bytes, pos: int, size: int, events: list[Event]) -> int:
        """Consume ``- name`` lines of region[pos:size] for the pending count report; return the new
        position."""
        st = self.state
        assert st.pending is not None
        kind, count, names, at = st.pending
        while len(names) < count:
            m = _DASH_LINE.match(region, pos, size)
            if not m:
                if pos < size:  # another line interrupts the list: report what we have
                    break
                return pos  # region ended mid-list: wait for more
            names.append(m[1].decode("utf-8", "replace"))
            pos = m.end()
        self._flush_pending(events)
        return pos

    def _flush_pending(self, events: list[Event]) -> None:
        kind, count, names, at = self.state.pending or ["", 0, [], 0]
        self.state.pending = None
        events.append(KeysReport(kind, tuple(names), count, at))

    def _monitor_hit(self, name: str, m: re.Match[bytes], region: bytes, base: int, events: list[Event]) -> None:
        groups = m.groupdict()
        if groups.get("value") is not None:
            step = _int(groups["step"]) if groups.get("step") else self.state.step
            self._record_sample(MetricSample(name, _float(groups["value"]), step, self.state.epoch, base + m.start()),
                         events)
        else:
            a = _line_start(region, m.start(), max(0, m.start() - self.max_line))
            sep = _SEP.search(region, m.end())
            line = region[a:sep.start() if sep else len(region)]
            events.append(PatternHit(name, line[:500].decode("utf-8", "replace"), base + a))
