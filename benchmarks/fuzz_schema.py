"""Hypothesis strategies built from a live server's /openapi.json: one request case per operation (POST bodies
of the declared request schema, GETs with fuzzed path parameters, raw garbage). Used by fuzz_volume.py and the
test suite's slice of it."""
from __future__ import annotations

import json
import urllib.parse
from typing import Any, NamedTuple

from hypothesis import strategies as st

# Wrong-typed values for any field (strict pydantic must refuse them with a 400, never a 500).
JUNK = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(), st.text(max_size=12),
                 st.lists(st.integers(-3, 9), max_size=3),
                 st.dictionaries(st.text(max_size=5), st.one_of(st.integers(), st.text(max_size=4)), max_size=2))
# Accepted values of these are capped so 10k requests stay cheap; out-of-range edges are still sent.
CAPS = {"max_tokens": 4, "max_completion_tokens": 4, "min_tokens": 4, "n": 3}
MAX_INT = 60_000  # above the default model's vocabulary (49152): out-of-vocab token ids are drawn too


class Case(NamedTuple):
    method: str
    path: str
    body: bytes | None
    via_openai: bool  # send with the openai client instead of raw httpx


def typed(schema: dict, comps: dict, name: str = "", depth: int = 0) -> st.SearchStrategy:
    """Values of the schema's own type, mostly in range, plus its boundary values just outside it."""
    if depth > 6:
        return JUNK
    if "$ref" in schema:
        return typed(comps[schema["$ref"].rsplit("/", 1)[1]], comps, name, depth + 1)
    for key in ("anyOf", "oneOf", "allOf"):
        if key in schema:
            return st.one_of([typed(s, comps, name, depth + 1) for s in schema[key]])
    if "const" in schema:
        return st.just(schema["const"])
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    t = schema.get("type")
    if t == "integer":
        lo = schema.get("minimum", schema.get("exclusiveMinimum", -6) + 1)
        hi = schema.get("maximum", schema.get("exclusiveMaximum", 2**63) - 1)
        edges = [lo - 1, hi + 1] + ([] if name in CAPS else [hi])
        return st.one_of(st.integers(max(lo, -6), min(hi, CAPS.get(name, MAX_INT))), st.sampled_from(edges))
    if t == "number":
        lo, hi = schema.get("minimum", schema.get("exclusiveMinimum")), schema.get("maximum")
        return st.floats(lo, hi, allow_nan=False, allow_infinity=False) | st.floats()
    if t == "string":
        return st.sampled_from(["default", "smollm2"]) if name == "model" else st.text(max_size=40)
    if t == "boolean":
        return st.booleans()
    if t == "null":
        return st.none()
    if t == "array":
        items = typed(schema.get("items", {}), comps, name, depth + 1)
        return st.lists(items, min_size=min(schema.get("minItems", 0), 2), max_size=min(schema.get("maxItems", 4), 4))
    if t == "object" and "properties" in schema:
        return object_of(schema, comps, junk=False, depth=depth + 1)
    if t == "object":
        return st.dictionaries(st.text(max_size=8), JUNK, max_size=3)
    return JUNK  # Any


def object_of(schema: dict, comps: dict, junk: bool, depth: int = 0) -> st.SearchStrategy:
    """junk: every optional field may appear, each right- or wrong-typed (nearly always a 400). Otherwise the
    required fields plus at most four optional ones, all right-typed (often accepted: these reach the engine)."""
    props, required = schema.get("properties", {}), set(schema.get("required", []))

    def value(name: str) -> st.SearchStrategy:
        v = typed(props[name], comps, name, depth)
        return v | JUNK if junk else v

    req = {n: value(n) for n in props if n in required}
    optional = sorted(n for n in props if n not in required)
    if junk:
        return st.fixed_dictionaries(req, optional={n: value(n) for n in optional})

    @st.composite
    def few(draw) -> dict:
        out = {n: draw(s) for n, s in req.items()}
        for n in draw(st.lists(st.sampled_from(optional), max_size=4, unique=True)) if optional else []:
            out[n] = draw(value(n))
        return out
    return few()


def cases(openapi: dict[str, Any]) -> st.SearchStrategy[Case]:
    """Every operation of the API: POSTs (weighted up: they carry the engine work) and GETs."""
    comps = openapi.get("components", {}).get("schemas", {})
    options: list[st.SearchStrategy[Case]] = []
    for path, item in openapi["paths"].items():
        for method, op in item.items():
            if "requestBody" in op:
                schema = op["requestBody"]["content"]["application/json"]["schema"]
                bodies = object_of(comps[schema["$ref"].rsplit("/", 1)[1]], comps, True) | \
                    object_of(comps[schema["$ref"].rsplit("/", 1)[1]], comps, False)
                raw = st.one_of(bodies.map(lambda b: json.dumps(b).encode()), st.binary(max_size=40))
                post = st.builds(Case, st.just(method.upper()), st.just(path), raw, st.booleans())
                options += [post] * 8
            else:
                names = [p["name"] for p in op.get("parameters", []) if p.get("in") == "path"]
                filled = st.fixed_dictionaries({n: st.sampled_from(["default"]) | st.text(min_size=1, max_size=20)
                                                for n in names}).map(lambda d, p=path: p.format(
                                                    **{k: urllib.parse.quote(v, safe="") for k, v in d.items()}))
                options.append(st.builds(Case, st.just(method.upper()), filled, st.none(), st.just(False)))
    return st.one_of(options)
