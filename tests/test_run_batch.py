"""Offline batch jobs on the real default model (float32): LLM.generate_iter, shared-prefix grouping and
`nanoflow run-batch` (OpenAI batch files: validation, response bodies, resume)."""
import json

import pytest

from nanoflow import LLM, SamplingParams
from nanoflow.batch.grouping import AdmissionWindow, prefix_key
from nanoflow.batch.run_batch import _EngineView, read_done, run_job
from nanoflow.server.serving import OpenAIServing

GREEDY = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
PROMPTS = ["The capital of France is", "1, 2, 3, 4,", "Once upon a time", "def add(a, b):", "Hello, my name is"]


@pytest.fixture(scope="module")
def llm():
    return LLM("default", dtype="float32", max_num_seqs=2)  # max_outstanding 4: the look-ahead shows


@pytest.fixture(scope="module")
def expected(llm):
    return [o.outputs[0].text for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]


@pytest.mark.slow
def test_generate_iter_pulls_lazily_and_matches_generate(llm, expected):
    pulled = []

    def prompts():
        for i, p in enumerate(PROMPTS * 2):
            pulled.append(i)
            yield p
    it = llm.generate_iter(prompts(), GREEDY, use_tqdm=False, lookahead=2)
    first = next(it)
    # Window (2) + engine (2 x max_num_seqs) + the one being pulled: not the whole generator.
    assert len(pulled) <= 2 + 4 + 1 < len(PROMPTS) * 2
    got = dict([first, *it])
    assert sorted(got) == list(range(len(PROMPTS) * 2))
    assert [got[i].outputs[0].text for i in range(len(PROMPTS) * 2)] == expected * 2
    assert not llm.engine.has_unfinished_requests()


@pytest.mark.slow
def test_interrupted_iteration_leaves_engine_clean(llm):
    def prompts():
        yield from PROMPTS[:3]
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        list(llm.generate_iter(prompts(), GREEDY, use_tqdm=False, lookahead=1))
    assert not llm.engine.has_unfinished_requests()


def test_window_groups_by_prefix_and_keeps_fifo_between_groups():
    w = AdmissionWindow(grouping=True)
    for item, key in [("a1", "A"), ("b1", "B"), ("a2", "A"), ("c1", None), ("b2", "B"), ("a3", "A")]:
        w.push(item, key)
    order = [w.pop() for _ in range(len(w))]
    assert [i for i, _ in order] == ["a1", "a2", "a3", "b1", "b2", "c1"]
    assert [i for i, leader in order if leader] == ["a1", "b1"]  # groups with followers start with a leader
    w.push("a4", "A"), w.push("a5", "A")
    assert w.pop() == ("a4", False)  # A's prefix was computed by its first leader: no second wait
    off = AdmissionWindow(grouping=False)
    for item, key in [("a1", "A"), ("b1", "B"), ("a2", "A")]:
        off.push(item, key)
    assert [off.pop()[0] for _ in range(3)] == ["a1", "b1", "a2"]


def test_prefix_key_covers_whole_blocks():
    assert prefix_key(list(range(15)), 16) is None
    assert prefix_key(list(range(16)) + [1], 16) == prefix_key(list(range(16)) + [2], 16)
    assert prefix_key(list(range(100)), 16) == prefix_key(list(range(64)) + [0] * 50, 16)  # 4 blocks
    assert prefix_key(list(range(100)), 16) != prefix_key([7] + list(range(1, 100)), 16)


@pytest.mark.slow
def test_grouping_keeps_outputs_in_input_order(llm):
    system = "You are a careful assistant who answers in one short sentence. " * 3
    prompts = [f"{s}Question {i}: name a colour." for i in range(3) for s in (system, system.upper())]
    got = dict(llm.generate_iter(prompts, GREEDY, use_tqdm=False, lookahead=len(prompts)))
    ref = [o.outputs[0].text for o in llm.generate(prompts[::2], GREEDY, use_tqdm=False)
           + llm.generate(prompts[1::2], GREEDY, use_tqdm=False)]
    ref[::2], ref[1::2] = ref[:3], ref[3:]
    assert [got[i].outputs[0].text for i in range(len(prompts))] == ref
    assert [got[i].prompt for i in range(len(prompts))] == prompts


def _line(cid, url, body):
    return json.dumps({"custom_id": cid, "method": "POST", "url": url, "body": body}) + "\n"


def _write_input(path):
    lines = [
        _line("chat", "/v1/chat/completions",
              {"messages": [{"role": "user", "content": "What is the capital of France?"}],
               "max_tokens": 4, "temperature": 0}),
        _line("two", "/v1/completions", {"prompt": PROMPTS[:2], "max_tokens": 4, "temperature": 0,
                                         "ignore_eos": True}),
        _line("bad-param", "/v1/completions", {"prompt": "x", "max_tokens": 0}),
        _line("bad-url", "/v1/embeddings", {"input": "x"}),
        "{not json\n",
        _line("too-long", "/v1/completions", {"prompt": "hi", "max_tokens": 10 ** 6}),
        _line("one", "/v1/completions", {"prompt": PROMPTS[2], "max_tokens": 4, "temperature": 0,
                                         "ignore_eos": True}),
        _line("two", "/v1/completions", {"prompt": "duplicate", "max_tokens": 1}),
    ]
    path.write_text("".join(lines))


def _records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_run_batch_answers_every_line(llm, expected, tmp_path):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    _write_input(inp)
    serving = OpenAIServing(_EngineView(llm.engine), ["default"])
    counts = run_job(llm.engine, serving, inp, out, progress=False)
    assert (counts.ok, counts.errors) == (3, 5)
    recs = _records(out)
    by_id = {}
    for r in recs:
        by_id.setdefault(r["custom_id"], []).append(r)
    ok = {cid: r["response"] for cid, rs in by_id.items() for r in rs if r["response"]["status_code"] == 200}
    assert [c["text"] for c in ok["two"]["body"]["choices"]] == expected[:2]
    assert ok["one"]["body"]["choices"][0]["text"] == expected[2]
    assert ok["one"]["body"]["object"] == "text_completion" and ok["one"]["body"]["usage"]["completion_tokens"] == 4
    assert ok["chat"]["body"]["object"] == "chat.completion"
    assert ok["chat"]["body"]["choices"][0]["message"]["role"] == "assistant"
    status = {cid: [r["response"]["status_code"] for r in rs] for cid, rs in by_id.items()}
    assert status["bad-param"] == [400] and status["bad-url"] == [404] and status["too-long"] == [400]
    assert status[None] == [400] and sorted(status["two"]) == [200, 400]  # bad JSON; duplicate custom_id
    assert by_id["bad-param"][0]["error"]["param"] == "max_tokens"
    assert all(r["error"] is None for r in recs if r["response"]["status_code"] == 200)


@pytest.mark.slow
def test_run_batch_resumes_and_tolerates_a_truncated_line(llm, tmp_path):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("".join(_line(f"r{i}", "/v1/completions", {"prompt": p, "max_tokens": 2, "temperature": 0})
                           for i, p in enumerate(PROMPTS)))
    serving = OpenAIServing(_EngineView(llm.engine), ["default"])
    run_job(llm.engine, serving, inp, out, progress=False)
    first = _records(out)
    kept = first[:2]
    out.write_text("".join(json.dumps(r) + "\n" for r in kept) + json.dumps(first[2])[:40])  # killed mid-line
    assert read_done(out) == {r["custom_id"] for r in kept}
    counts = run_job(llm.engine, serving, inp, out, progress=False)
    assert (counts.ok, counts.skipped) == (3, 2)
    recs = _records(out)
    assert sorted(r["custom_id"] for r in recs) == [f"r{i}" for i in range(len(PROMPTS))]
    assert recs[:2] == kept


def test_cli_parses_run_batch():
    from nanoflow.cli import build_parser
    args = build_parser().parse_args(["run-batch", "-i", "a.jsonl", "-o", "b.jsonl", "--data-parallel-size", "2",
                                      "--no-prefix-grouping"])
    assert (args.input_file, args.output_file, args.data_parallel_size, args.prefix_grouping) == \
        ("a.jsonl", "b.jsonl", 2, False)
