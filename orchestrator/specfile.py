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

from orchestrator.errors import OrchdError, SpecError
from orchestrator.spec import JobSpec

Path_ = tuple[str | int, ...]


MAX_YAML_BYTES = 1 << 20  # a spec or config file is a few KB; more is a mistake or an attack
MAX_YAML_NODES = 100_000  # values after alias expansion (a 400-byte "billion laughs" file has 10^9)


class _Builder:
    """Turns a composed YAML node into Python data, recording each key path's 1-based line.
    Keys are names (YAML 1.1 would read ``on:`` as True and ``1:`` as an int); aliases are
    expanded at most MAX_YAML_NODES values in all, and an alias to its own ancestor is refused."""

    def __init__(self, where: str, error: type[OrchdError]):
        self.where, self.error = where, error
        self.lines: dict[Path_, int] = {}
        self.count = 0
        self.open: set[int] = set()  # ids of the nodes being built (an alias back to one loops forever)

    def build(self, node: yaml.Node, path: Path_) -> Any:
        line = node.start_mark.line + 1
        self.lines.setdefault(path, line)
        self.count += 1
        if self.count > MAX_YAML_NODES:
            raise self.error(f"{self.where}:{line}: more than {MAX_YAML_NODES} values once aliases are expanded "
                             "(an alias bomb?)")
        if id(node) in self.open:
            raise self.error(f"{self.where}:{line}: {'.'.join(map(str, path)) or 'the document'}: "
                             "an alias refers to a value that contains it")
        if isinstance(node, yaml.MappingNode):
            self.open.add(id(node))
            out: dict[Any, Any] = {}
            for key_node, value_node in node.value:
                key = key_node.value if isinstance(key_node, yaml.ScalarNode) else str(key_node.start_mark)
                if key in out:
                    raise self.error(f"{self.where}:{key_node.start_mark.line + 1}: duplicate key "
                                     f"{'.'.join(map(str, (*path, key)))!r}")
                self.lines[(*path, key)] = key_node.start_mark.line + 1
                out[key] = self.build(value_node, (*path, key))
            self.open.discard(id(node))
            return out
        if isinstance(node, yaml.SequenceNode):
            self.open.add(id(node))
            items = [self.build(item, (*path, i)) for i, item in enumerate(node.value)]
            self.open.discard(id(node))
            return items
        try:
            return yaml.SafeLoader("").construct_object(node, deep=True)
        except yaml.YAMLError as e:
            raise self.error(f"{self.where}:{line}: {'.'.join(map(str, path))}: {getattr(e, 'problem', e)}") from None


def load_yaml(text: str, where: str, error: type[OrchdError] = SpecError,
              what: str = "a job spec is a mapping of keys (name, command, ...)",
              ) -> tuple[dict[str, Any], dict[Path_, int]]:
    """Parse YAML text into (data, {key path: line}). Raises ``error`` (SpecError) naming
    ``where`` and the line on bad YAML, a file over MAX_YAML_BYTES, too many values after
    alias expansion, recursive aliases or nesting too deep."""
    if len(text) > MAX_YAML_BYTES:
        raise error(f"{where}: {len(text)} bytes; a YAML file here may have at most {MAX_YAML_BYTES}")
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise error(f"{where}{line}: not valid YAML: {getattr(e, 'problem', e)}") from None
    except RecursionError:
        raise error(f"{where}: nested too deeply") from None
    if node is None or not isinstance(node, yaml.MappingNode):
        raise error(f"{where}:1: {what}")
    builder = _Builder(where, error)
    try:
        data = builder.build(node, ())
    except RecursionError:
        raise error(f"{where}: nested too deeply") from None
    return data, builder.lines


def _line_for(loc: Path_, lines: dict[Path_, int]) -> int:
    """The line of the longest prefix of ``loc`` that the file has (the key itself if present)."""
    loc = tuple(p for p in loc if p != "metrics" or loc[:1] != ("expect",))  # expect.<metric> lives at top
    for n in range(len(loc), -1, -1):
        if loc[:n] in lines:
            return lines[loc[:n]]
    return 1


def format_errors(err: ValidationError, where: str, lines: dict[Path_, int],
                  unknown: str = "unknown key (not part of the job spec; see README 'Job spec reference')") -> str:
    """pydantic's errors as ``file:line: key.path: message (got value)`` lines."""
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
            msg = unknown
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
    if isinstance(data.get("sbatch"), str):
        data["sbatch"] = str((p.resolve().parent / data["sbatch"]).resolve())
    try:
        JobSpec.model_validate(data)  # errors point at the file as written, before expansion
        specs = [JobSpec.model_validate(one) for one in _expand_sweep(data, where, lines)]
    except ValidationError as e:
        raise SpecError(format_errors(e, where, lines)) from None
    if not Path(specs[0].workdir).is_dir():
        raise SpecError(f"{where}:{lines.get(('workdir',), 1)}: workdir: {specs[0].workdir} is not a directory")
    if specs[0].sbatch is not None and not Path(specs[0].sbatch).is_file():
        raise SpecError(f"{where}:{lines.get(('sbatch',), 1)}: sbatch: {specs[0].sbatch} is not a file")
    return specs
