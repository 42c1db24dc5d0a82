"""A provider's published OpenAPI document (``tests/contracts/``) as a validator, so an
emulator cannot quietly agree with orchd's own mistakes: every request an emulator receives and
every response it gives is checked against the operation's schemas.

OpenAPI 3.1 schemas are JSON Schema 2020-12 (``jsonschema`` + ``referencing`` resolve the
document's ``#/components/...`` references). Checked: the path and method exist; query
parameters are declared and of their schema (``style: form, explode: false`` arrays split on
commas); a JSON body matches the request schema; a response status is declared (else
``default``) and its JSON body matches.
"""

from __future__ import annotations

import json
import re
from functools import cached_property
from pathlib import Path
from typing import Any

import yaml
from jsonschema import Draft202012Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

CONTRACTS = Path(__file__).resolve().parents[1] / "contracts"  # copies of the providers' documents
URI = "urn:contract"


class Contract:
    """One OpenAPI document. ``check_request``/``check_response`` return a list of violations
    (empty: the exchange is what the provider documents)."""

    def __init__(self, filename: str):
        path = CONTRACTS / filename
        text = path.read_text()
        self.doc: dict[str, Any] = json.loads(text) if filename.endswith(".json") else yaml.safe_load(text)
        resource = Resource.from_contents(self.doc, default_specification=DRAFT202012)
        self.registry = Registry().with_resource(URI, resource)

    @cached_property
    def _routes(self) -> list[tuple[re.Pattern[str], str]]:
        out = []
        for template in self.doc["paths"]:
            pattern = re.sub(r"\\\{[^}]+\\\}", "[^/]+", re.escape(template))
            out.append((re.compile(f"^{pattern}/?$"), template))
        # literal paths before templated ones: /v2/pods/ids would otherwise match /v2/pods/{id}
        return sorted(out, key=lambda r: r[1].count("{"))

    def operation(self, method: str, path: str) -> tuple[str, dict[str, Any]] | None:
        """(path template, operation object) for ``METHOD path``, or None if undocumented."""
        for pattern, template in self._routes:
            if pattern.match(path):
                op = self.doc["paths"][template].get(method.lower())
                if op is not None:
                    return template, op
        return None

    def _resolve(self, obj: dict[str, Any]) -> dict[str, Any]:
        while "$ref" in obj:
            obj = self.registry.resolver(URI).lookup(URI + obj["$ref"]).contents
        return obj

    def _errors(self, schema: dict[str, Any], value: Any, where: str) -> list[str]:
        v = Draft202012Validator(_absolute(schema), registry=self.registry)
        return [f"{where}: {'/'.join(map(str, e.absolute_path)) or '$'}: {e.message[:300]}"
                for e in v.iter_errors(value)]

    def check_request(self, method: str, path: str, query: dict[str, list[str]], body: Any) -> list[str]:
        found = self.operation(method, path)
        if found is None:
            return [f"{method} {path}: not in the contract"]
        template, op = found
        out = []
        params = {p["name"]: p for p in map(self._resolve, [*self.doc["paths"][template].get("parameters", []),
                                                           *op.get("parameters", [])]) if p["in"] == "query"}
        for name, values in query.items():
            if name not in params:
                out.append(f"{method} {template}: query parameter {name!r} is not documented")
                continue
            schema = self._resolve(params[name].get("schema", {}))
            for raw in values:
                value: Any = raw
                if schema.get("type") == "array":
                    value = raw.split(",") if params[name].get("explode") is False else [raw]
                elif schema.get("type") == "integer":
                    value = int(raw) if raw.lstrip("-").isdigit() else raw
                elif schema.get("type") == "boolean":
                    value = {"true": True, "false": False}.get(raw, raw)
                out += self._errors(params[name]["schema"], value, f"{method} {template} ?{name}")
        for name, p in params.items():
            if p.get("required") and name not in query:
                out.append(f"{method} {template}: required query parameter {name!r} missing")
        rb = op.get("requestBody")
        if rb is not None:
            rb = self._resolve(rb)
            schema = rb.get("content", {}).get("application/json", {}).get("schema")
            if body is None and rb.get("required"):
                out.append(f"{method} {template}: a JSON body is required")
            elif body is not None and schema is not None:
                out += self._errors(schema, body, f"{method} {template} body")
        elif body is not None:
            out.append(f"{method} {template}: takes no body")
        return out

    def check_response(self, method: str, path: str, status: int, body: Any) -> list[str]:
        found = self.operation(method, path)
        if found is None:
            return [f"{method} {path}: not in the contract"]
        template, op = found
        responses = op.get("responses", {})
        spec = responses.get(str(status)) or responses.get("default")
        if spec is None:
            return [f"{method} {template}: status {status} is not documented"]
        spec = self._resolve(spec)
        content = spec.get("content") or {}
        if not content:
            return [] if body is None else [f"{method} {template} {status}: documented without a body"]
        schema = next(iter(content.values())).get("schema")
        if schema is None:
            return []
        return self._errors(schema, body, f"{method} {template} {status}")


def _absolute(schema: Any) -> Any:
    """``schema`` with the document's local references (``#/components/...``) made absolute."""
    if isinstance(schema, dict):
        return {k: (URI + v if k == "$ref" and isinstance(v, str) and v.startswith("#") else _absolute(v))
                for k, v in schema.items()}
    if isinstance(schema, list):
        return [_absolute(x) for x in schema]
    return schema
