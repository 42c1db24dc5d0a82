"""The log parser on real logs (tests/data/, made by make_corpus.py) and on edge cases, each
with both line finders (Hyperscan, and the bytes.find merge used where it has no wheel) and both
recognisers (orchestrator/_linescan.c, and the regexes used where it was not built)."""

import json
import math
import random
import shutil
import sysconfig

import pytest

from orchestrator import linefind, logparse
from orchestrator.db import state_json
from orchestrator.logparse import KeysReport, LogParser, MetricSample, ParserState, PatternHit
from tests.conftest import DATA

METRICS = ["val_loss", "train_loss", "nrmse"]
COMPILED = logparse._linescan  # (the fixture below may hide it)


@pytest.fixture(autouse=True, params=["hyperscan", "find"])
def line_finder(request, monkeypatch):
    """Every test with each line finder; "find" as on a platform without the hyperscan wheel."""
    if request.param == "hyperscan":
        assert linefind.hyperscan is not None, "the hyperscan wheel is a dependency where it has one"
    else:
        monkeypatch.setattr(linefind, "hyperscan", None)
    linefind.finder.cache_clear()
    yield request.param
    linefind.finder.cache_clear()


@pytest.fixture(autouse=True, params=["C", "re"])
def recogniser(request, monkeypatch):
    """Every test with each recogniser; "re" as where orchd was installed without a C compiler."""
    if request.param == "C":
        if logparse._linescan is None and shutil.which((sysconfig.get_config_var("CC") or "cc").split()[0]):
            pytest.fail("orchestrator/_linescan.c was not built, though a C compiler is here: see setup.py")
        if logparse._linescan is None:
            pytest.skip("no C compiler where orchd was installed")
    else:
        monkeypatch.setattr(logparse, "_linescan", None)
    return request.param


def parse(data: bytes, **kw) -> list:
    events, consumed = LogParser(kw.pop("metrics", METRICS), **kw).feed(data, 0, final=True)
    assert consumed == len(data)
    return events


def metrics(events, name):
    return [(e.step, e.epoch, e.value) for e in events if isinstance(e, MetricSample) and e.name == name]


def feed_in_pieces(data: bytes, sizes, before: int = 0, **kw) -> list:
    """Feed like the tick does: from the stored offset, a growing file, state carried as JSON;
    ``before``: with up to that many bytes before the offset (``skip``, as logread.read_new gives them)."""
    state: dict = {}
    offset, events, visible = 0, [], 0
    for size in sizes:
        visible = min(len(data), visible + size)
        p = LogParser(METRICS, state=ParserState.from_dict(state), **kw)
        first = max(0, offset - before)
        new, consumed = p.feed(data[first:visible], offset, final=visible == len(data), skip=offset - first)
        events += new
        offset += consumed
        state = json.loads(state_json(p.state.to_dict()))  # as the tick stores it and reads it back
        if visible == len(data):
            break
    return events


def test_hf_trainer_log():
    ev = parse((DATA / "hf_trainer.log").read_bytes())
    assert metrics(ev, "val_loss") == [(None, 1.0, 0.6918), (None, 2.0, 0.6916)]  # eval_loss
    assert metrics(ev, "train_loss")[:2] == [(None, 0.5, 0.6934), (None, 1.0, 0.6923)]  # 'loss'


def test_lightning_tqdm_log_progress_bars_deduplicated():
    data = (DATA / "lightning_tqdm.log").read_bytes()
    assert data.count(b"\r") > 100  # the refreshes really are \r-separated
    ev = parse(data)
    vals = metrics(ev, "val_loss")
    assert [v for _, _, v in vals] == [6.15, 6.15, 2.1, 2.1, 0.239]
    assert vals[-1][1] == 2.0  # "Epoch 2:"
    # each distinct bar state once, not once per refresh
    assert len(metrics(ev, "train_loss")) == len(set(metrics(ev, "train_loss")))


def test_lightning_rich_log():
    ev = parse((DATA / "lightning_rich.log").read_bytes())
    assert metrics(ev, "val_loss") == [(None, 2.0, 0.239)] and metrics(ev, "train_loss") == [(None, 2.0, 0.168)]


def test_strict_load_error_and_incompatible_keys():
    ev = [e for e in parse((DATA / "strict_load.log").read_bytes()) if isinstance(e, KeysReport)]
    assert [(e.kind, e.keys, e.count) for e in ev] == [
        ("missing", ("3.weight", "3.bias"), 2), ("unexpected", (), 0), ("missing", ("3.weight", "3.bias"), 2)]


def test_count_then_dash_lines_and_hf_warning():
    log = (b"Missing keys: 2\n  - a.alpha\n  - a.H_scale\nUnexpected keys: 0\nstep 5 val_loss=1.0\n"
           b"Some weights of Net were not initialized from the model checkpoint at x and are newly initialized: "
           b"['head.weight', 'head.bias']\n")
    ev = [e for e in parse(log) if isinstance(e, KeysReport)]
    assert [(e.kind, e.keys, e.count) for e in ev] == [
        ("missing", ("a.alpha", "a.H_scale"), 2), ("unexpected", (), 0), ("missing", ("head.weight", "head.bias"), 2)]


def test_formats_step_and_nonfinite_values():
    log = (b"step 3 | train_loss: 0.5 | val_loss=nan\n"
           b"{'eval_loss': '0.25', 'epoch': '1.5', 'step': 7}\n"
           b'{"val_loss": 0.125, "global_step": 9}\n'
           b"val_loss=tensor(0.0625)\n"
           b"Epoch 3: 100%|###| 5/5 [00:01, val_loss=inf]\r"
           b"my_val_loss=99 xval_loss=98 nrmse=-inf\n")
    ev = parse(log)
    vals = metrics(ev, "val_loss")
    assert vals[0][:2] == (3, None) and math.isnan(vals[0][2])
    assert vals[1:4] == [(7, 1.5, 0.25), (9, 1.5, 0.125), (9, 1.5, 0.0625)]  # step carries to the next line
    assert vals[4] == (9, 3.0, math.inf)
    assert len(vals) == 5  # my_val_loss / xval_loss are other names
    assert metrics(ev, "nrmse") == [(9, 3.0, -math.inf)]


def test_a_repeated_nonfinite_value_is_one_sample_however_the_log_is_split():
    """A progress bar repeating val_loss=nan (or inf) at one step is one sample, also when the
    repeats fall in different ticks: the parser state is stored as JSON, which has no NaN or
    infinity, so it remembers them by their text (orjson would write null for both)."""
    log = b"".join(b"step 5 train_loss=0.5 val_loss=%s\r" % v for v in
                   (b"nan", b"nan", b"inf", b"inf", b"inf", b"-inf", b"-inf", b"NaN", b"0.25", b"0.25"))
    expected = [(5, None, "nan"), (5, None, "inf"), (5, None, "-inf"), (5, None, "nan"), (5, None, "0.25")]
    for sizes in ([len(log)], [27] * len(log), [1] * len(log)):
        vals = metrics(feed_in_pieces(log, sizes), "val_loss")
        assert [(step, epoch, str(v)) for step, epoch, v in vals] == expected, sizes
        assert metrics(feed_in_pieces(log, sizes), "train_loss") == [(5, None, 0.5)]


def test_a_state_stored_before_nonfinite_values_were_keyed_by_text_still_drops_their_repeats():
    """Parser states json.dumps wrote before (a NaN as null, an infinity as Infinity) are read as
    the parser keys them now: the repeat of a NaN or an infinity at the same step is still a repeat."""
    for value, line in (("null", b"step 5 val_loss=nan\n"), ("Infinity", b"step 5 val_loss=inf\n"),
                        ("-Infinity", b"step 5 val_loss=-inf\n"), ("0.5", b"step 5 val_loss=0.5\n")):
        state = ParserState.from_dict(json.loads('{"step": 5, "last": {"val_loss": [5, null, ' + value + ']}}'))
        events, _ = LogParser(METRICS, state=state).feed(line + b"step 5 val_loss=0.25\n", 0)
        assert metrics(events, "val_loss") == [(5, None, 0.25)], value


def test_partial_last_line_waits():
    p = LogParser(METRICS)
    ev, consumed = p.feed(b"step 1 val_loss=0.5\nstep 2 val_lo", 0)
    assert consumed == 20 and metrics(ev, "val_loss") == [(1, None, 0.5)]
    ev, consumed = p.feed(b"step 2 val_loss=0.4\n", 20)
    assert metrics(ev, "val_loss") == [(2, None, 0.4)] and consumed == 20


def test_any_split_gives_the_same_events():
    data = b"".join((DATA / n).read_bytes() for n in ("lightning_tqdm.log", "hf_trainer.log", "strict_load.log"))
    data += b"Missing keys: 3\n - x.a\n - x.b\n - x.c\nstep 9 val_loss=0.1\n"
    whole = feed_in_pieces(data, [len(data)])
    rng = random.Random(0)
    for n in range(20):
        sizes = [rng.randint(1, 400) for _ in range(len(data))]
        pieces = feed_in_pieces(data, sizes, before=(0, 64, 1000)[n % 3])  # (before: the bytes read_new checks)
        assert [(type(e), getattr(e, "name", None), getattr(e, "keys", None), getattr(e, "value", None),
                 getattr(e, "offset", None)) for e in pieces] == [
            (type(e), getattr(e, "name", None), getattr(e, "keys", None), getattr(e, "value", None),
             getattr(e, "offset", None)) for e in whole]


def test_overlong_line_skipped_with_bounded_memory():
    p = LogParser(METRICS, max_line=1 << 16)
    huge = b"x" * (1 << 20)  # no newline: fed as it grows, in 64 KiB reads
    offset = 0
    while offset < len(huge):
        _, consumed = p.feed(huge[offset:offset + (1 << 16)], offset)
        assert consumed > 0  # never stuck re-reading the same bytes
        offset += consumed
    ev, consumed = p.feed(b"val_loss=1 still the long line\nstep 2 val_loss=0.5\n", offset)
    assert metrics(ev, "val_loss") == [(2, None, 0.5)]


def test_invalid_utf8_and_garbage():
    log = b"\xff\xfe step 4 val_loss=0.5 \xc3\x28\nMissing key(s) in state_dict: \"a\xffb\", \"c\".\nval_loss=1e999x\n"
    ev = parse(log)
    assert metrics(ev, "val_loss")[0] == (4, None, 0.5)
    keys = [e for e in ev if isinstance(e, KeysReport)][0]
    assert keys.count == 2 and keys.keys[1] == "c" and "\ufffd" in keys.keys[0]


def test_monitors_and_watched_text():
    log = b"acc@1 71.2 at it 40\nNCCL error: unhandled system error\nok\n"
    ev = parse(log, monitors=[("top1", r"acc@1 (?P<value>[\d.]+) at it (?P<step>\d+)"), ("warn", r"unhandled")],
               watch=[("log:NCCL error", "NCCL error")])
    assert metrics(ev, "top1") == [(40, None, 71.2)]
    hits = [(e.name, e.line) for e in ev if isinstance(e, PatternHit)]
    assert ("log:NCCL error", "NCCL error: unhandled system error") in hits and ("warn", hits[0][1]) in hits


@pytest.mark.parametrize("name", ["eval_loss", "val/loss", "validation_loss"])
def test_val_loss_aliases(name):
    assert metrics(parse(f"step 1 {name}=0.5\n".encode()), "val_loss") == [(1, None, 0.5)]


def _hostile_log(rng: random.Random, lines: int) -> bytes:
    parts = [b"step 3 val_loss=0.5", b"loss loss loss=1", b"lossloss", b"Missing keys: 2", b" - a.b", b"- c",
             b"\xff\xfe val_loss=\xc3", b"nrmse: 0.25 train_loss=2", b"Some weights of X were not used",
             b"x" * 300, b"", b"'loss': '0.3', 'epoch': '1.5'", b"unexpected_keys=[]", b"45%|# | 9/20 [00:01, loss=3]",
             b"NCCL error loss=4", b"a NCCL error, a CUDA error"]
    seps = [b"\n", b"\r", b"\r\n", b"\n\n"]
    return b"".join(rng.choice(parts) + rng.choice(seps) for _ in range(lines)) + rng.choice(parts)


@pytest.mark.parametrize("limit", [1, 3, linefind.LIMIT])
def test_line_finders_agree_on_hostile_logs(monkeypatch, line_finder, limit):
    """Hyperscan's lines and the bytes.find merge's are the same lines, whatever the mix of
    terminators, repeated anchors, key lists and invalid UTF-8, whether the parser takes them
    in lists of ``limit`` or all at once, fed whole or in random pieces."""
    monkeypatch.setattr(linefind, "LIMIT", limit)
    rng = random.Random(limit)
    for _ in range(20):
        data = _hostile_log(rng, 200)
        region = data[:max(data.rfind(b"\n"), data.rfind(b"\r")) + 1]
        for anchors, marked, watched in [
                ((b"loss",), (), ()), ((b"issing", b"loss", b"nexpected", b"nrmse"), (b"issing",), (b"NCCL error",)),
                ((b"Some weights of", b"issing", b"loss", b"nexpected"), (b"issing", b"nexpected"),
                 (b"CUDA error", b"NCCL error"))]:
            def line(b, region=region):  # the line whose terminator is at b
                return region[max(region.rfind(b"\n", 0, b), region.rfind(b"\r", 0, b)) + 1:b]

            terminators = [b for b in range(len(region)) if region[b:b + 1] in b"\r\n"]
            expected = [b for b in terminators if any(a in line(b) for a in anchors)]
            expected_marked = {b for b in expected if any(a in line(b) for a in marked)}
            expected_watched = [(b, k) for b in terminators for k, w in enumerate(watched) if w in line(b)]
            assert expected_watched or not watched
            want = linefind.FindLines(anchors, marked, watched).line_ends(region, 0, None, 10**9)
            assert want == (expected, expected_marked, expected_watched)  # the fallback is right by definition
            got, got_marked, got_watched, start = [], set(), [], 0
            while True:
                ends, keyed, watch = linefind.finder(anchors, marked, watched).line_ends(region, start, None, limit)
                got_watched += watch
                got += ends
                got_marked |= keyed & set(ends)  # (a finder may mark lines past the ones it returns)
                if len(ends) < limit:  # (all found: else resumed after the last line returned)
                    break
                start = ends[-1]
            assert (got, got_marked, got_watched) == (expected, expected_marked, expected_watched), line_finder
        whole = parse(data)
        pieces = feed_in_pieces(data, [rng.randint(1, 500) for _ in range(len(data))])
        assert [repr(e) for e in pieces] == [repr(e) for e in whole]
        with monkeypatch.context() as m:  # the same events from the other finder, all at once
            m.setattr(linefind, "hyperscan", None if line_finder == "hyperscan" else linefind.hyperscan)
            m.setattr(linefind, "LIMIT", 10**9)
            linefind.finder.cache_clear()
            assert [repr(e) for e in parse(data)] == [repr(e) for e in whole]
        linefind.finder.cache_clear()


def _tricky_line(rng: random.Random) -> bytes:
    """A line from the pieces where the regexes' semantics are subtle: separators (a space is
    one for step and epoch, a tab alone is not), quotes, tensor(, the forms of a number, names
    inside longer words, tqdm counts, digits past 64 bits."""
    names = [b"val_loss", b"train_loss", b"loss", b"nrmse", b"eval_loss", b"val/loss", b"valid_loss", b"xval_loss",
             b"a.loss", b"/loss", b"_loss", b"loss_x", b"validation_loss", b"train/loss"]
    numbers = [b"0.5", b"-1e-3", b"+.5", b"1.", b"1.e5", b"1e", b"1e+", b".e1", b"nan", b"NaN", b"naN", b"NAN", b"inf",
               b"-Infinity", b"Infin", b"INF", b"iNf", b"+-1", b"-", b"9" * 30, b"1" * 400, b"tensor(2.5)",
               b"tensor(x)", b"'0.25'", b'"3"', b"1_0", b"0x10"]
    seps = [b"=", b": ", b"':", b'": ', b" = ", b"\t=\t", b" ", b"\t", b"=\t'", b"==", b":"]
    words = [b"step", b"Step", b"global_step", b"iteration", b"iter", b"iterations", b"epoch", b"Epoch", b"xstep",
             b"'step'", b"steps", b"'epoch'"]
    values = [b"5", b"12/300", b"007", b"9" * 25, b"1.5", b"2.", b"x", b"'3'", b"1" * 5000, b"0" * 4400 + b"5"]
    pieces = []
    for _ in range(rng.randint(1, 8)):
        r = rng.random()
        if r < 0.45:
            pieces.append(rng.choice(names) + rng.choice(seps) + rng.choice(numbers))
        elif r < 0.75:
            pieces.append(rng.choice(words) + rng.choice(seps + [b"  ", b" \t", b"\t "]) + rng.choice(values))
        elif r < 0.85:
            pieces.append(rng.choice([b"", b"x", b" "]) + b"%d/%d [" % (rng.randint(0, 99), rng.randint(0, 999)))
        else:
            pieces.append(rng.choice([b"|", b",", b"x", b"{", b"'", b"\xff", b"/", b".", b"_"]))
    return rng.choice([b" ", b"", b", ", b"x"]).join(pieces)


def test_compiled_recogniser_agrees_with_the_regexes(monkeypatch, recogniser):
    """The events from _linescan.c are the events from the regexes, on 20,000 lines of the
    corner cases (each run once per recogniser: the other one is the reference)."""
    rng = random.Random(7)
    log = b"\n".join(_tricky_line(rng) for _ in range(20000)) + b"\n"
    log += b"step 9 " + b" ".join(b"loss=%d val_loss: %d.5" % (i, i) for i in range(5000)) + b"\n"  # 10,000 pairs
    mine = parse(log)
    assert sum(isinstance(e, MetricSample) and e.step == 9 for e in mine) >= 10_000
    if COMPILED is None:
        pytest.skip("no C compiler where orchd was installed")
    monkeypatch.setattr(logparse, "_linescan", None if recogniser == "C" else COMPILED)
    reference = parse(log)
    assert sum(isinstance(e, MetricSample) for e in mine) > 5000
    assert [repr(e) for e in mine] == [repr(e) for e in reference]
