from pathlib import Path

import pytest
from sqlalchemy import func, select

from orchestrator import service
from orchestrator.errors import SpecError
from orchestrator.models import Event, Job
from orchestrator.specfile import load_spec_file
from tests.conftest import ROOT, write_spec


@pytest.mark.parametrize("path", sorted((ROOT / "jobspecs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_specs_are_valid(path: Path):
    specs = load_spec_file(path)
    assert specs and all(Path(s.workdir) == ROOT for s in specs)


def test_main_spec_values():
    (spec,) = load_spec_file(ROOT / "jobspecs/sota_push_v2.yaml")
    assert spec.resources.time_limit == 1200
    assert spec.retry.max_attempts == 3 and spec.retry.delay(1) == 5 and spec.retry.delay(2) == 10
    assert [t.when for t in spec.retry.on] == ["NODE_FAIL", "exit:137", "log:NCCL error"]
    assert spec.expect.metrics["val_loss"].at_step == 90


def test_sweep_expands_and_substitutes():
    specs = load_spec_file(ROOT / "jobspecs/burgers_sweep.yaml")
    assert [s.command.split("--depths ")[1][:5] for s in specs] == ["1 1 1", "2 2 2"]
    assert specs[0].name == "burgers_depth_sweep[depths=1 1 1]"


BAD = """name: bad
command: echo hi
resources:
  nodes: 1
  gpus_per_node: -1
  time_limt: 20m
retry: {max_attempts: 3, on: [NODE_FAIL, "exit:0"]}
cancel_if: ["val_loss is nan", "foo bar"]
"""


def test_malformed_spec_names_key_and_line(tmp_path):
    with pytest.raises(SpecError) as e:
        load_spec_file(write_spec(tmp_path, BAD))
    msg = str(e.value)
    assert "spec.yaml:5: resources.gpus_per_node" in msg
    assert "spec.yaml:6: resources.time_limt: unknown key" in msg
    assert "spec.yaml:7: retry.on.1: 'exit:0'" in msg
    assert "spec.yaml:8: cancel_if.1: 'foo bar' is not a condition" in msg


@pytest.mark.parametrize("text,needle", [
    ("workdir: /tmp\nname: [unclosed\ncommand: a\n", "spec.yaml:3: not valid YAML"),
    ("name: x\nname: y\ncommand: a\n", "spec.yaml:2: duplicate key 'name'"),
    ("- a\n- b\n", "spec.yaml:1: a job spec is a mapping"),
    ("name: x\ncommand: a\nresources: {time_limit: 20}\n", "resources.time_limit: 20 has no unit"),
    ("name: x\ncommand: a\nsuccess: 'top1 > 0.5'\n", "['top1'] are used in rules but not listed"),
    ("name: x\ncommand: a {lr}\nsweep: {depth: [1, 2]}\n", "sweep.depth: '{depth}' appears nowhere"),
    ("name: x\ncommand: a\nworkdir: /nonexistent/dir\n", "workdir: /nonexistent/dir is not a directory"),
    ("name: x\ncommand: a\nbackend: kubernetes\n", "spec.yaml:3: backend: Input should be"),
    ("name: x\ncommand: a\nbackend: runpod\nresources: {nodes: 2}\n", "rents one instance per attempt"),
    ("name: x\ncommand: a\nbackend: vastai\nshutdown: {on_end: false, idle: 1h}\n", "on_end: false"),
    ("name: x\ncommand: a\nsync: [../secrets]\n", "sync paths are relative to workdir"),
    ("name: x\ncommand: a\nresources: {cloud_type: CHEAP}\n", "cloud_type"),
])
def test_other_spec_errors(tmp_path, text, needle):
    with pytest.raises(SpecError, match=None) as e:
        load_spec_file(write_spec(tmp_path, text))
    assert needle in str(e.value)


def test_malformed_spec_leaves_database_unchanged(tmp_path, app: service.App):
    ok = write_spec(tmp_path, "name: ok\ncommand: 'true'\n", "ok.yaml")
    service.submit(app, ok, start_now=False)
    with app.sessions() as s:
        before = (s.scalar(select(func.count(Job.id))), s.scalar(select(func.count(Event.id))))
    with pytest.raises(SpecError):
        service.submit(app, write_spec(tmp_path, BAD, "bad.yaml"))
    with app.sessions() as s:
        assert (s.scalar(select(func.count(Job.id))), s.scalar(select(func.count(Event.id)))) == before == (1, 1)


def test_cli_reports_spec_error_without_traceback(tmp_path, orchd):
    p = orchd("submit", str(write_spec(tmp_path, BAD)), check=False)
    assert p.returncode == 2
    assert "resources.time_limt: unknown key" in p.stderr and "Traceback" not in p.stderr
