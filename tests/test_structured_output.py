"""Structured output (xgrammar) offline: every output is valid for its spec, greedy and sampled, with async
scheduling and without; unconstrained rows are unaffected by constrained batch-mates; bad specs are
ValueErrors when the params are built. The server side is in test_structured_output_server.py."""
from __future__ import annotations

import json
import re

import pytest
import torch

from nanoflow import LLM, SamplingParams
from nanoflow.engine.sampler import SampleRow, Sampler
from nanoflow.sampling_params import StructuredOutputsParams as SO

PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age", "pet"],
          "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer"},
                         "pet": {"enum": ["cat", "dog", "none"]}}}
DATE = r"20[0-9]{2}-(0[1-9]|1[0-2])-[0-3][0-9]"
CHOICES = ["positive", "negative", "neutral"]
# (prompt, spec, check): small specs so that every output closes well within MAX_TOKENS.
CASES = [
    ("Describe a person as JSON:", SO(json=PERSON, disable_any_whitespace=True), "person"),
    ("Alice is 31 and has a cat. As JSON:", SO(json=json.dumps(PERSON)), "person"),
    ("Today's date is", SO(regex=DATE), "date"),
    ("The answer (yes or no) is", SO(regex="(yes|no)"), "yesno"),
    ("Sentiment of 'I love this movie':", SO(choice=CHOICES), "choice"),
    ("Sentiment of 'the food was cold':", SO(choice=CHOICES), "choice"),
    ("A word in brackets:", SO(grammar='root ::= "(" [a-z]+ ")"'), "brackets"),
    ('JSON: {"a": 1}\nJSON: {"b": 2}\nJSON:', SO(json_object=True), "object"),
]
MAX_TOKENS = 48


def check(kind: str, text: str) -> None:
    if kind == "person":
        obj = json.loads(text)
        assert set(obj) == {"name", "age", "pet"}, text
        assert isinstance(obj["name"], str) and len(obj["name"]) <= 12, text
        assert isinstance(obj["age"], int) and not isinstance(obj["age"], bool), text
        assert obj["pet"] in ("cat", "dog", "none"), text
    elif kind == "date":
        assert re.fullmatch(DATE, text), text
    elif kind == "yesno":
        assert text in ("yes", "no"), text
    elif kind == "choice":
        assert text in CHOICES, text
    elif kind == "brackets":
        assert re.fullmatch(r"\([a-z]+\)", text), text
    elif kind == "object":
        assert isinstance(json.loads(text), dict), text
    else:
        raise AssertionError(kind)


@pytest.fixture(scope="module")
def llm():
    return LLM("default", max_model_len=512, max_num_seqs=16, async_scheduling=True)


@pytest.fixture(scope="module")
def llm_sync():
    return LLM("default", max_model_len=512, max_num_seqs=16, async_scheduling=False)


@pytest.mark.slow
@pytest.mark.parametrize("engine,temperature", [("llm", 0.0), ("llm", 0.8), ("llm_sync", 0.8)])
def test_every_output_is_valid(request, engine, temperature):
    """Constrained and free rows in one batch (async: the next step's masks come from this step's tokens)."""
    llm = request.getfixturevalue(engine)
    prompts = [p for p, _, _ in CASES] + ["Once upon a time,"]
    params = [SamplingParams(temperature=temperature, seed=7, max_tokens=MAX_TOKENS, structured_outputs=so)
              for _, so, _ in CASES] + [SamplingParams(temperature=temperature, max_tokens=MAX_TOKENS)]
    outs = llm.generate(prompts, params, use_tqdm=False)
    for (_, _, kind), out in zip(CASES, outs):
        o = out.outputs[0]
        assert o.finish_reason == "stop", (kind, o.text)
        check(kind, o.text)
    free = outs[-1].outputs[0]
    assert len(free.token_ids) == MAX_TOKENS and free.finish_reason == "length"


@pytest.mark.slow
def test_n_samples_each_valid(llm):
    out = llm.generate(["Pick one:"], SamplingParams(n=4, temperature=1.0, max_tokens=8,
                                                      structured_outputs=SO(choice=["red", "green", "blue"])),
                       use_tqdm=False)[0]
    assert len(out.outputs) == 4 and all(o.text in ("red", "green", "blue") for o in out.outputs)


@pytest.mark.slow
def test_grammars_compiled_once(llm):
    cache = llm.engine.grammars
    cache.compile(SO(regex="[a-c]{4}"))
    size = cache._compiler.get_cache_size_bytes()
    cache.compile(SO(regex="[a-c]{4}"))
    assert cache._compiler.get_cache_size_bytes() == size  # the second one came from the cache


@pytest.mark.parametrize("spec", [
    dict(json={"type": "no-such-type"}), dict(json="{not json"), dict(regex="(abc"), dict(regex="a{3,1}"),
    dict(grammar="root ::= undefined_rule"), dict(choice=[]), dict(choice=["a", ""]), dict(),
    dict(regex="a", choice=["a"]),
])
def test_invalid_spec_is_value_error(spec):
    with pytest.raises(ValueError, match="structured_outputs"):
        SamplingParams(structured_outputs=spec)


@pytest.mark.slow
def test_unconstrained_rows_unaffected_and_fast_path_kept(monkeypatch):
    """float32 (batch-invariant here): free rows give the same greedy text with constrained batch-mates."""
    llm = LLM("default", dtype="float32", max_model_len=256, max_num_seqs=8, async_scheduling=True)
    free = ["The capital of France is", "def fibonacci(n):"]
    greedy = SamplingParams(temperature=0, max_tokens=12)
    alone = [o.outputs[0].text for o in llm.generate(free, greedy, use_tqdm=False)]
    mixed = llm.generate(free + ["Pick:"], [greedy, greedy, SamplingParams(
        temperature=0, max_tokens=12, structured_outputs=SO(choice=["x", "y"]))], use_tqdm=False)
    assert [o.outputs[0].text for o in mixed[:2]] == alone
    assert mixed[2].outputs[0].text in ("x", "y")
    # No constrained row: the bf16 argmax fast path runs and no grammar state is touched.
    calls = []
    import nanoflow.engine.sampler as sampler_mod
    real = sampler_mod._argmax
    monkeypatch.setattr(sampler_mod, "_argmax", lambda x: calls.append(1) or real(x))
    s = Sampler()
    rows = [SampleRow(f"r{i}", SamplingParams(temperature=0)) for i in range(3)]
    res = s(torch.randn(3, 50), rows, torch.zeros(3, dtype=torch.long))
    assert calls == [1] and res.grammar_done is None and not s._grammars._matchers


@pytest.mark.slow
def test_grammar_end_finishes_even_with_ignore_eos(llm):
    """The request ends when its grammar is complete, also when EOS itself would not end it."""
    out = llm.generate(["Is the sky blue?"], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True,
                                                             structured_outputs=SO(choice=["yes", "no"])),
                       use_tqdm=False)[0].outputs[0]
    assert out.text in ("yes", "no") and out.finish_reason == "stop" and len(out.token_ids) < 16
