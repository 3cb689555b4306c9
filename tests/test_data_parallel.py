"""Data-parallel replicas on this machine: 2 engine processes of one core each, default model in float32.
Greedy outputs equal a single engine's; killing a replica mid-job still gives every result exactly once."""
import json
import os
import signal

import pytest

from nanoflow import LLM, SamplingParams
from nanoflow.engine.data_parallel import split_cores

GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
PROMPTS = ["The capital of France is", "1, 2, 3, 4,", "Once upon a time", "def add(a, b):",
           "Hello, my name is", "The best way to learn is", "Water boils at", "My favourite food is"]


@pytest.fixture(scope="module")
def dp():
    llm = LLM("default", dtype="float32", data_parallel_size=2)
    yield llm
    llm.engine.shutdown()


@pytest.fixture(scope="module")
def expected():
    single = LLM("default", dtype="float32", num_threads=1)
    return [o.outputs[0].text for o in single.generate(PROMPTS, GREEDY, use_tqdm=False)]


def test_split_cores():
    assert split_cores(2, [0, 1]) == [[0], [1]]
    assert split_cores(2, [0, 1, 2, 3, 4]) == [[0, 1], [2, 3]]
    assert split_cores(3, [5]) == [[5], [5], [5]]


@pytest.mark.slow
def test_replicas_are_pinned_processes(dp):
    assert len(dp.engine.replicas) == 2 and all(r.alive for r in dp.engine.replicas)
    if len(os.sched_getaffinity(0)) >= 2:
        pinned = [os.sched_getaffinity(r.process.pid) for r in dp.engine.replicas]
        assert all(len(c) == 1 for c in pinned) and pinned[0] != pinned[1]


@pytest.mark.slow
def test_greedy_outputs_equal_a_single_engine(dp, expected):
    outs = dp.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert [o.outputs[0].text for o in outs] == expected
    assert {r.rank for r in dp.engine.replicas if r.stats is not None} == {0, 1}  # both did work
    assert dp.engine.stats.generated_tokens >= len(PROMPTS) * GREEDY.max_tokens


@pytest.mark.slow
def test_shared_prefix_goes_to_the_same_replica(dp):
    eng = dp.engine
    prefix = list(range(1000, 1064))  # four full KV blocks
    p = SamplingParams(max_tokens=1)
    eng.add_request("aff-0", prefix + [5], p)
    eng.add_request("aff-other", list(range(2000, 2064)), p)  # the other replica is now less loaded
    eng.add_request("aff-1", prefix + [6, 7], p)
    placed = {rid: eng._outstanding[rid].replica for rid in ("aff-0", "aff-1", "aff-other")}
    assert placed["aff-0"] == placed["aff-1"] != placed["aff-other"]
    for rid in placed:
        eng.abort_request(rid)
    assert not eng.has_unfinished_requests()


@pytest.mark.slow
def test_run_batch_on_replicas(dp, expected, tmp_path):
    from nanoflow.batch.run_batch import _EngineView, run_job
    from nanoflow.server.serving import OpenAIServing
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("".join(json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/completions",
                                       "body": {"prompt": p, "max_tokens": 6, "temperature": 0, "ignore_eos": True}})
                           + "\n" for i, p in enumerate(PROMPTS[:4])))
    counts = run_job(dp.engine, OpenAIServing(_EngineView(dp.engine), ["default"]), inp, out, progress=False)
    assert counts.ok == 4
    texts = {r["custom_id"]: r["response"]["body"]["choices"][0]["text"] for r in map(json.loads, open(out))}
    assert texts == {f"r{i}": expected[i] for i in range(4)}


@pytest.mark.slow
def test_serve_on_replicas(dp, expected):
    import httpx

    from nanoflow.server.app import ServerThread, build_app
    app = build_app(dp.engine, ["default"])
    with ServerThread(app) as url:
        body = {"prompt": PROMPTS[:3], "max_tokens": 6, "temperature": 0, "ignore_eos": True}
        r = httpx.post(f"{url}/v1/completions", json=body, timeout=120).json()
        assert [c["text"] for c in r["choices"]] == expected[:3]
        with httpx.stream("POST", f"{url}/v1/completions", json={**body, "prompt": PROMPTS[3], "stream": True},
                          timeout=120) as s:
            chunks = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: {")]
        assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == expected[3]
        assert httpx.get(f"{url}/metrics").status_code == 200  # gauges read the replicas' snapshots
    app.state.async_engine.shutdown()
    assert not dp.engine.has_unfinished_requests()


@pytest.mark.slow
def test_killed_replica_loses_nothing(dp, expected):
    """Last in the file: it leaves the fixture with one replica."""
    it = dp.generate_iter(PROMPTS, GREEDY, use_tqdm=False)
    got = [next(it)]
    eng = dp.engine
    victim = max(eng.replicas, key=lambda r: sum(o.replica == r.rank for o in eng._outstanding.values()))
    assert any(o.replica == victim.rank for o in eng._outstanding.values())  # it has unfinished work
    os.kill(victim.process.pid, signal.SIGKILL)
    got += list(it)
    assert sorted(i for i, _ in got) == list(range(len(PROMPTS)))  # each exactly once
    assert [o.outputs[0].text for _, o in sorted(got, key=lambda x: x[0])] == expected
    assert not victim.alive
    assert [o.outputs[0].text for o in dp.generate(PROMPTS[:2], GREEDY, use_tqdm=False)] == expected[:2]
