"""Read a job spec file: YAML with line numbers, validation errors that point at the line,
relative paths resolved, and sweeps expanded into one spec per combination.

An error reads ``jobspecs/x.yaml:7: resources.gpus_per_node: Input should be ... (got -1)``.
"""

from __future__ import annotations

import itertools
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from orchestrator.errors import SpecError
from orchestrator.spec import JobSpec

Path_ = tuple[str | int, ...]


def _construct(node: yaml.Node, path: Path_, lines: dict[Path_, int], where: str) -> Any:
    """Turn a composed YAML node into Python data, recording each key path's 1-based line."""
    lines[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        out: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            # keys are names: YAML 1.1 would read `on:` as True and `1:` as an int
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else str(key_node.start_mark)
            if key in out:
                raise SpecError(f"{where}:{key_node.start_mark.line + 1}: duplicate key "
                                f"{'.'.join(map(str, (*path, key)))!r}")
            lines[(*path, key)] = key_node.start_mark.line + 1
            out[key] = _construct(value_node, (*path, key), lines, where)
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_construct(item, (*path, i), lines, where) for i, item in enumerate(node.value)]
    loader = yaml.SafeLoader("")
    return loader.construct_object(node, deep=True)


def load_yaml(text: str, where: str) -> tuple[dict[str, Any], dict[Path_, int]]:
    """Parse YAML text into (data, {key path: line}). Raises SpecError on bad YAML."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise SpecError(f"{where}{line}: not valid YAML: {getattr(e, 'problem', e)}") from None
    if node is None or not isinstance(node, yaml.MappingNode):
        raise SpecError(f"{where}:1: a job spec is a mapping of keys (name, command, ...)")
    lines: dict[Path_, int] = {}
    return _construct(node, (), lines, where), lines


def _line_for(loc: Path_, lines: dict[Path_, int]) -> int:
    """The line of the longest prefix of ``loc`` that the file has (the key itself if present)."""
    loc = tuple(p for p in loc if p != "metrics" or loc[:1] != ("expect",))  # expect.<metric> lives at top
    for n in range(len(loc), -1, -1):
        if loc[:n] in lines:
            return lines[loc[:n]]
    return 1


def _format_errors(err: ValidationError, where: str, lines: dict[Path_, int]) -> str:
    msgs = []
    for e in err.errors():
        # pydantic adds union branch / validator names to loc; keep the keys the user wrote
        loc = tuple(p for p in e["loc"] if isinstance(p, int) or not re.search(r"[\[\(]|^function-", str(p)))
        if loc[:1] == ("expect",) and loc[1:2] == ("metrics",):
            loc = ("expect", *loc[2:])
        if loc[:2] == ("retry", "on") and loc[3:4] == ("when",):
            loc = loc[:3]  # a plain string trigger was wrapped as {when: ...}
        key = ".".join(map(str, loc)) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key (not part of the job spec; see README 'Job spec reference')"
        got = "" if e["type"] in ("extra_forbidden", "missing") else f" (got {e.get('input')!r})"
        msgs.append(f"{where}:{_line_for(loc, lines)}: {key}: {msg}{got}")
    return "\n".join(dict.fromkeys(msgs))


def _expand_sweep(data: dict[str, Any], where: str, lines: dict[Path_, int]) -> list[dict[str, Any]]:
    """One data dict per combination of ``sweep`` values, ``{key}`` substituted in command and env."""
    sweep = data.get("sweep") or {}
    if not isinstance(sweep, dict) or not sweep:
        return [data]
    for key, values in sweep.items():
        line = lines.get(("sweep", key), 1)
        if not isinstance(values, list) or not values:
            raise SpecError(f"{where}:{line}: sweep.{key}: give a non-empty list of values")
        if f"{{{key}}}" not in str(data.get("command", "")) + str(data.get("env", "")):
            raise SpecError(f"{where}:{line}: sweep.{key}: '{{{key}}}' appears nowhere in command or env")
    out = []
    for combo in itertools.product(*sweep.values()):
        values = dict(zip(sweep, map(str, combo), strict=True))

        def fill(s: Any, values: dict[str, str] = values) -> Any:
            return re.sub(r"\{(\w+)\}", lambda m: values.get(m[1], m[0]), s) if isinstance(s, str) else s

        one = dict(data)
        one["command"] = fill(data.get("command"))
        if isinstance(data.get("env"), dict):
            one["env"] = {k: fill(v) for k, v in data["env"].items()}
        one["name"] = f"{data.get('name')}[{','.join(f'{k}={v}' for k, v in values.items())}]"
        one["sweep"] = {k: [v] for k, v in values.items()}
        out.append(one)
    return out


def load_spec_file(path: str | Path) -> list[JobSpec]:
    """Read, validate and expand one spec file. ``workdir`` becomes an absolute path (relative
    to the file's directory). Returns one JobSpec per sweep combination. Raises SpecError."""
    p = Path(path)
    where = str(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise SpecError(f"{where}: cannot read the spec: {e}") from None
    data, lines = load_yaml(text, where)
    data.setdefault("workdir", ".")
    if isinstance(data["workdir"], str):
        data["workdir"] = str((p.resolve().parent / data["workdir"]).resolve())
    try:
        JobSpec.model_validate(data)  # errors point at the file as written, before expansion
        specs = [JobSpec.model_validate(one) for one in _expand_sweep(data, where, lines)]
    except ValidationError as e:
        raise SpecError(_format_errors(e, where, lines)) from None
    if not Path(specs[0].workdir).is_dir():
        raise SpecError(f"{where}:{lines.get(('workdir',), 1)}: workdir: {specs[0].workdir} is not a directory")
    return specs
