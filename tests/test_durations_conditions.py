import pytest

from orchestrator.conditions import Diverges, IsNaN, KeyCount, NoProgress, Threshold, parse_condition
from orchestrator.durations import format_duration, parse_duration


@pytest.mark.parametrize("text,seconds", [
    ("30s", 30), ("20m", 1200), ("1h30m", 5400), ("2d", 172800), ("1.5h", 5400),
    ("05:00", 300), ("01:00:00", 3600), ("1-00", 86400), ("1-02:03:04", 93784),
])
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("bad", ["20", 20, "abc", "0s", "1x", "1-2-3"])
def test_bad_durations_name_the_forms(bad):
    with pytest.raises(ValueError, match="30s|longer than zero"):
        parse_duration(bad)


def test_format_duration():
    assert format_duration(3725) == "1h02m05s" and format_duration(59) == "59s" and format_duration(None) == "-"


def test_conditions():
    assert parse_condition("val_loss < 0.34 by step 270") == Threshold("val_loss", "<", 0.34, by_step=270)
    assert parse_condition("val_loss > 2 after step 100") == Threshold("val_loss", ">", 2, after_step=100)
    assert parse_condition("val_loss is nan") == IsNaN("val_loss")
    assert parse_condition("train_loss > 3x best") == Diverges("train_loss", 3.0)
    assert parse_condition("missing_keys > 2") == KeyCount("missing", ">", 2)
    assert parse_condition("no_progress 20m") == NoProgress(1200)
    c = parse_condition("val_loss < 0.34 by step 270")
    assert c.holds(0.3, 200) and not c.holds(0.3, 271) and not c.holds(0.35, 100)


@pytest.mark.parametrize("bad", ["val_loss", "missing_keys > 2.5", "no_progress soon", "val_loss << 3"])
def test_bad_conditions(bad):
    with pytest.raises(ValueError, match="condition|whole number|duration"):
        parse_condition(bad)
