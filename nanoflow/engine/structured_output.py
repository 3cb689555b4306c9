"""Structured output with xgrammar (the grammar engine vLLM and SGLang use): JSON schema, JSON object, regex,
choice and EBNF grammar constraints, shaped like vLLM's `StructuredOutputsParams`.

Three parts, on three sides of the engine:
- `StructuredOutputsParams` (user side): the spec; validated when it is built (a bad schema or regex is a
  ValueError at request validation, the server's 400), without the tokenizer.
- `GrammarCompilerCache` (engine thread): compiles a spec against the model's tokenizer once; xgrammar's
  compiler cache is keyed by the spec's text, so equal specs share one compiled grammar.
- `GrammarMatchers` (device worker, inside the sampler): one matcher per constrained request, advanced with
  each sampled token in the same step, so the next step's mask is ready even when that step was launched
  before this one's tokens were read back (async scheduling). Rows without a grammar never wait for it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class StructuredOutputsParams:
    """vLLM's names: exactly one of json (schema, as dict or JSON text), regex, choice, grammar (EBNF) or
    json_object=True (any JSON object)."""
    json: str | dict | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    disable_any_whitespace: bool = False  # JSON without free whitespace (small models may loop on newlines)

    def __post_init__(self) -> None:
        kinds = [k for k in ("json", "regex", "choice", "grammar") if getattr(self, k) is not None]
        kinds += ["json_object"] if self.json_object else []
        if len(kinds) != 1:
            raise ValueError(f"structured_outputs must set exactly one of json, regex, choice, grammar, "
                             f"json_object; got {kinds or 'none'}")
        if self.choice is not None and (not isinstance(self.choice, list) or not self.choice
                                        or not all(isinstance(c, str) and c for c in self.choice)):
            raise ValueError("structured_outputs choice must be a non-empty list of non-empty strings")
        if isinstance(self.json, str):  # a schema given as text must be JSON
            try:
                json.loads(self.json)
            except ValueError as e:
                raise ValueError(f"structured_outputs json is not valid JSON: {e}") from None
        self.key()  # compile the spec without a tokenizer: the grammar errors come out here, not in a step

    @property
    def kind(self) -> str:
        if self.json_object:
            return "json_object"
        return next(k for k in ("json", "regex", "choice", "grammar") if getattr(self, k) is not None)

    def source(self) -> str:
        """The spec as text (the compiler cache's key, with the kind)."""
        if self.kind == "json":
            return self.json if isinstance(self.json, str) else json.dumps(self.json)  # key order: generation order
        if self.kind == "choice":  # one EBNF alternative per choice, as vLLM's choice_as_grammar
            return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in self.choice)
        if self.kind == "json_object":
            return ""
        return self.regex if self.kind == "regex" else self.grammar

    def key(self) -> tuple[str, str, bool]:
        """Parses the spec with xgrammar once (no tokenizer needed): ValueError when it is invalid."""
        import xgrammar as xgr
        kind, src = self.kind, self.source()
        try:
            if kind == "json":
                xgr.Grammar.from_json_schema(src, any_whitespace=not self.disable_any_whitespace)
            elif kind == "regex":
                xgr.Grammar.from_regex(src)
            elif kind in ("choice", "grammar"):
                xgr.Grammar.from_ebnf(src)
        except (RuntimeError, ValueError, TypeError) as e:  # xgrammar raises RuntimeError with the C++ message
            raise ValueError(f"structured_outputs {kind} is invalid: {_short(e)}") from None
        return kind, src, self.disable_any_whitespace

    @classmethod
    def from_openai(cls, response_format: dict | None, extra: dict[str, Any]) -> "StructuredOutputsParams | None":
        """From OpenAI's response_format and vLLM's structured_outputs / guided_* request fields."""
        specs = []
        if response_format and response_format.get("type", "text") != "text":
            specs.append(_from_response_format(response_format))
        so = extra.get("structured_outputs")
        if so is not None:
            if not isinstance(so, dict):
                raise ValueError("structured_outputs must be an object")
            known = {"json", "regex", "choice", "grammar", "json_object", "disable_any_whitespace"}
            unknown = sorted(k for k, v in so.items() if k not in known and v is not None)
            if unknown:  # (structural_tag, whitespace_pattern, ...): refused, never silently ignored
                raise ValueError(f"structured_outputs field {unknown[0]!r} is not supported by this server")
            specs.append(cls(**{k: v for k, v in so.items() if v is not None}))
        for name in ("json", "regex", "choice", "grammar"):  # vLLM's older guided_* fields
            if extra.get(f"guided_{name}") is not None:
                specs.append(cls(**{name: extra[f"guided_{name}"]}))
        if len(specs) > 1:
            raise ValueError("structured_outputs may be given only once (response_format, structured_outputs or "
                             "guided_*)")
        return specs[0] if specs else None


def _from_response_format(rf: dict) -> StructuredOutputsParams:
    kind = rf.get("type")
    if kind == "json_object":
        return StructuredOutputsParams(json_object=True)
    if kind == "json_schema":
        js = rf.get("json_schema")
        schema = js.get("schema") if isinstance(js, dict) else None
        if not isinstance(schema, dict):
            raise ValueError("response_format json_schema needs json_schema.schema (a JSON Schema object)")
        return StructuredOutputsParams(json=schema)
    raise ValueError(f"response_format type must be text, json_object or json_schema, got {kind!r}")


def _short(e: Exception) -> str:
    """xgrammar's message without its C++ source location prefix."""
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return msg.split(": ", 1)[1] if msg.startswith("[") and ": " in msg else msg


class GrammarCompilerCache:
    """Compiles specs against the model's tokenizer (built on first use: TokenizerInfo takes ~0.1 s)."""

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: list[int]) -> None:
        self._tokenizer, self._vocab_size, self._stop = tokenizer, vocab_size, list(stop_token_ids)
        self._compiler = None

    def compile(self, spec: StructuredOutputsParams | None):
        """The compiled grammar (xgrammar caches it by the spec's text), or None without a spec."""
        if spec is None:
            return None
        if self._tokenizer is None:
            raise ValueError("structured_outputs needs the model's tokenizer (this model has none)")
        import xgrammar as xgr
        if self._compiler is None:
            # vocab_size is the logits' width (may exceed the tokenizer's): the masks cover every logit.
            info = xgr.TokenizerInfo.from_huggingface(self._tokenizer, vocab_size=self._vocab_size,
                                                      stop_token_ids=self._stop)
            self._compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=True)
        kind, src, no_ws = spec.key()
        c = self._compiler
        try:
            if kind == "json":
                return c.compile_json_schema(src, any_whitespace=not no_ws)
            if kind == "json_object":
                return c.compile_builtin_json_grammar()
            if kind == "regex":
                return c.compile_regex(src)
            return c.compile_grammar(src)
        except (RuntimeError, ValueError) as e:
            raise ValueError(f"structured_outputs {kind} is invalid: {_short(e)}") from None


class GrammarMatchers:
    """Per-request matchers on the device side: mask a step's constrained rows, then advance them."""

    def __init__(self) -> None:
        self._matchers: dict[str, Any] = {}
        self._bitmask: torch.Tensor | None = None

    def apply(self, logits: torch.Tensor, rows: list, idx: list[int]) -> list[int]:
        """Mask rows `idx` of float32 `logits` in place to the tokens their grammar allows next; returns the
        rows actually masked (a terminated matcher, whose row's token the engine discards, is left alone)."""
        import xgrammar as xgr
        vocab = rows[idx[0]].params._grammar.tokenizer_info.vocab_size
        if self._bitmask is None or self._bitmask.shape[0] < len(rows) or self._bitmask.shape[1] * 32 < vocab:
            self._bitmask = xgr.allocate_token_bitmask(max(len(rows), 8), vocab)
        masked = []
        for i in idx:
            m = self._matcher(rows[i])
            if not m.is_terminated():
                m.fill_next_token_bitmask(self._bitmask, i)
                masked.append(i)
        if masked:
            xgr.apply_token_bitmask_inplace(logits, self._bitmask[: len(rows)].to(logits.device), vocab_size=vocab,
                                            indices=masked)
        return masked

    def accept(self, rows: list, idx: list[int], tokens: list[int]) -> list[bool]:
        """Advance rows `idx` with their sampled tokens; per row of the step: its grammar has terminated."""
        done = [False] * len(rows)
        for i in idx:
            m = self._matcher(rows[i])
            if not m.is_terminated():
                # A refused token (only if a later logits change unmasked it) ends the row rather than derail it.
                done[i] = not m.accept_token(tokens[i]) or m.is_terminated()
            else:
                done[i] = True
        return done

    def release(self, request_id: str) -> None:
        self._matchers.pop(request_id, None)

    def _matcher(self, row):
        m = self._matchers.get(row.request_id)
        if m is None:
            import xgrammar as xgr
            m = self._matchers[row.request_id] = xgr.GrammarMatcher(row.params._grammar)
        return m
