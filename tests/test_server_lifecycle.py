"""`nanoflow serve` as a real process: ready only once warmed up, 413 over the body limit,
and on SIGTERM in-flight requests either finish or end with an OpenAI error / SSE error event and [DONE]."""
from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

from nanoflow import LLM
from nanoflow.server.app import build_app

pytestmark = pytest.mark.slow  # servers in subprocesses

BODY_LIMIT = 4096


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def proc():
    port = _free_port()
    p = subprocess.Popen([sys.executable, "-m", "nanoflow.cli", "serve", "--model", "default", "--dtype", "float32",
                          "--port", str(port), "--max-model-len", "4096", "--shutdown-timeout", "4",
                          "--max-request-body-bytes", str(BODY_LIMIT), "--log-level", "warning"],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 600  # model load + warm-up (a first C++ build takes minutes on a busy machine)
    while time.time() < deadline:
        assert p.poll() is None, p.stdout.read()
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                break
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    yield p, url
    if p.poll() is None:
        p.kill()
    p.wait(timeout=30)


def test_warm_up_before_serving():
    """build_app runs one request through prefill and decode before anything can reach the server."""
    llm = LLM("default", dtype="float32", max_model_len=128)
    build_app(llm.engine).state.async_engine.shutdown()
    st = llm.engine.stats
    assert st.num_steps == 2 and st.generated_tokens == 2 and not llm.engine.has_unfinished_requests()
    bm = llm.engine.scheduler.block_manager
    assert bm.num_free_blocks == bm.num_blocks


def test_body_over_the_limit_is_413(proc):
    _, url = proc
    big = json.dumps({"prompt": "x " * BODY_LIMIT, "max_tokens": 1})
    r = httpx.post(url + "/v1/completions", content=big, headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == 413 and r.json()["error"]["code"] == 413
    r = httpx.post(url + "/v1/completions", content=iter([big[:3000].encode(), big[3000:].encode()]),
                   headers={"content-type": "application/json"}, timeout=60)  # chunked: no Content-Length
    assert r.status_code == 413 and "bytes" in r.json()["error"]["message"]
    r = httpx.post(url + "/v1/completions", json={"prompt": "x", "max_tokens": 1}, timeout=60)
    assert r.status_code == 200


def _stream(url: str, body: dict, got: list, started: threading.Event) -> None:
    with httpx.stream("POST", url + "/v1/completions", json={**body, "stream": True}, timeout=120) as r:
        for line in r.iter_lines():
            if line:
                got.append(line)
                started.set()


def test_sigterm_drains_then_ends_the_rest_with_errors(proc):
    p, url = proc
    long = {"prompt": "Count to a million:", "max_tokens": 3000, "ignore_eos": True, "temperature": 0}
    short = {"prompt": "Hello", "max_tokens": 6, "ignore_eos": True}
    lines_long, lines_short, plain = [], [], []
    ev_long, ev_short = threading.Event(), threading.Event()
    threads = [threading.Thread(target=_stream, args=(url, long, lines_long, ev_long)),
               threading.Thread(target=lambda: plain.append(httpx.post(url + "/v1/completions", json=long,
                                                                       timeout=120)))]
    for t in threads:
        t.start()
    assert ev_long.wait(120)
    deadline = time.time() + 60  # the non-streamed request is running too
    while _metric(url, "num_requests_running") < 2 and time.time() < deadline:
        time.sleep(0.05)
    short_thread = threading.Thread(target=_stream, args=(url, short, lines_short, ev_short))
    short_thread.start()
    assert ev_short.wait(120)  # in flight when the signal comes
    p.send_signal(signal.SIGTERM)
    for t in [*threads, short_thread]:
        t.join(timeout=120)
    # The short one finished inside the grace period, normally.
    assert lines_short[-1] == "data: [DONE]"
    assert json.loads(lines_short[-2][6:])["choices"][0]["finish_reason"] == "length"
    # The long stream ended with an error event, then [DONE]: not cut mid-body.
    assert lines_long[-1] == "data: [DONE]"
    err = json.loads(lines_long[-2][6:])["error"]
    assert err["code"] == 503 and "shutting down" in err["message"]
    # The long non-streamed one got a 503 with an OpenAI body.
    assert plain[0].status_code == 503 and plain[0].json()["error"]["code"] == 503
    assert p.wait(timeout=60) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal it handled once done
    with pytest.raises(httpx.ConnectError):
        httpx.get(url + "/health", timeout=5)


def _metric(url: str, name: str) -> float:
    for line in httpx.get(url + "/metrics", timeout=30).text.splitlines():
        if line.startswith(f"nanoflow:{name} "):
            return float(line.split()[1])
    raise AssertionError(name)
