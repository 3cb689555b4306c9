"""`--device` / `EngineConfig.device`: validation and the CLI's one-line errors, explicit `cpu` equal to the
default, and (on a GPU machine only) the engine on CUDA against the CPU: greedy tokens, every executor, async
off, seeded sampling, the host KV tier."""
import pytest
import torch

from nanoflow import LLM, SamplingParams
from nanoflow.config import EngineConfig, preferred_dtype, resolve_device

from tests.conftest import PROMPTS

N = 16
GREEDY = SamplingParams(temperature=0.0, max_tokens=N, ignore_eos=True)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")


def greedy(llm, prompts=PROMPTS[:4], params=GREEDY) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(list(prompts), params, use_tqdm=False)]


# ---- validation (CPU) ----
@pytest.mark.parametrize("bad", ["tpu", "gpu", "cuda:", "cuda:x", "cpu:0", "CUDA", ""])
def test_unknown_device_is_a_clear_error(bad):
    with pytest.raises(ValueError, match="unsupported device"):
        resolve_device(bad)
    with pytest.raises(ValueError, match="unsupported device"):
        EngineConfig(device=bad)


@no_cuda
def test_cuda_without_cuda_is_a_clear_error():
    assert EngineConfig().device == "cpu" and resolve_device("auto") == "cpu"
    for dev in ("cuda", "cuda:0"):
        with pytest.raises(ValueError, match="CUDA is not available.*use --device cpu"):
            EngineConfig(device=dev)


def test_cuda_index_and_dtype_rules(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("auto") == "cuda" and resolve_device("cuda:0") == "cuda:0"
    with pytest.raises(ValueError, match="only 1 CUDA device"):
        resolve_device("cuda:1")
    # dtype auto follows the chosen device, not whether a GPU exists somewhere
    assert preferred_dtype("cuda") == preferred_dtype("cuda:0") == "bfloat16"
    assert preferred_dtype("cpu") in ("bfloat16", "float32")


@no_cuda
@pytest.mark.parametrize("dev, msg", [("cuda", "CUDA is not available"), ("tpu", "unsupported device")])
def test_cli_device_error_is_one_line(capsys, dev, msg):
    from nanoflow.cli import main
    assert main(["generate", "x", "--device", dev]) == 2
    err = capsys.readouterr().err
    assert err.startswith("nanoflow: error:") and msg in err and err.count("\n") == 1


def test_optimum_measures_the_engines_device(monkeypatch):
    from nanoflow.bench import offline
    from nanoflow.models.config import get_preset
    from nanoflow.costmodel import peak
    seen = {}
    monkeypatch.setattr(peak, "measure_gemm_peak", lambda *a, **kw: seen.update(kw) or 1e12)
    offline.optimum(get_preset("smollm2-135m"), torch.float32, 64, 0.01, "cuda:0")
    assert seen["device"] == "cuda:0"


def test_kv_salt_of_cpu_unchanged():
    from nanoflow.engine.kv_tiers import kv_cache_salt
    from nanoflow.models.loader import ModelSource
    src = ModelSource("dummy", "smollm2-135m")
    assert kv_cache_salt(src, torch.float32, 16, 0) == kv_cache_salt(src, torch.float32, 16, 0, "cpu")
    assert kv_cache_salt(src, torch.float32, 16, 0, "cuda:0") != kv_cache_salt(src, torch.float32, 16, 0)


@pytest.fixture(scope="module")
def cpu_tokens():
    """Greedy tokens of the default engine (float32) on the CPU: the reference of every test below."""
    llm = LLM("default", dtype="float32", device="cpu")
    assert llm.engine.runner.device.type == "cpu" and llm.engine.runner.stream is None
    return greedy(llm)


@pytest.mark.slow
@no_cuda
def test_explicit_cpu_equals_the_default(cpu_tokens):
    llm = LLM("default", dtype="float32")
    assert llm.engine.config.device == "cpu"
    assert greedy(llm) == cpu_tokens


# ---- on a GPU ----
@pytest.fixture(scope="module")
def cuda_llm():
    return LLM("default", dtype="float32", device="cuda")


@pytest.mark.slow
@needs_cuda
def test_cuda_engine_matches_cpu(cuda_llm, cpu_tokens):
    runner = cuda_llm.engine.runner
    assert runner.device.type == "cuda" and runner.stream is not None
    assert all(kv.is_cuda for kv in runner.kv_caches)
    assert all(p.is_cuda for p in runner.model.parameters())
    assert greedy(cuda_llm) == cpu_tokens
    assert greedy(cuda_llm) == cpu_tokens  # again: CUDA graphs are captured on a shape's second sight


@pytest.mark.slow
@needs_cuda
@pytest.mark.parametrize("executor", ["sequential", "nanobatch", "overlap"])
def test_cuda_executors_match_cpu(executor, cpu_tokens):
    # 4 prompts in a 32-token budget: chunked prefill, nano-batches cutting through chunks
    llm = LLM("default", dtype="float32", device="cuda", executor=executor, dense_batch=32)
    assert greedy(llm) == cpu_tokens
    llm.engine.runner.executor.close()


@pytest.mark.slow
@needs_cuda
def test_cuda_without_async_matches_cpu(cpu_tokens):
    assert greedy(LLM("default", dtype="float32", device="cuda", async_scheduling=False)) == cpu_tokens


@pytest.mark.slow
@needs_cuda
def test_cuda_seeded_sampling_ignores_batch_mates(cuda_llm):
    seeded = SamplingParams(temperature=0.8, top_p=0.9, seed=7, max_tokens=N, ignore_eos=True)
    alone = greedy(cuda_llm, PROMPTS[:1], seeded)[0]
    mates = [seeded] + [SamplingParams(temperature=1.0, max_tokens=N, ignore_eos=True)] * 3
    outs = cuda_llm.generate(list(PROMPTS[:4]), mates, use_tqdm=False)
    assert outs[0].outputs[0].token_ids == alone


@pytest.mark.slow
@needs_cuda
def test_cuda_bf16_runs(cpu_tokens):
    out = greedy(LLM("default", device="cuda", dtype="bfloat16"))
    assert [len(t) for t in out] == [N] * len(cpu_tokens)  # bf16 may pick other tokens than float32


@pytest.mark.slow
@needs_cuda
def test_cuda_host_tier_reload(cpu_tokens):
    """A finished request's KV goes to the host tier (copy stream) and comes back (pinned staging) instead of
    being recomputed; tokens stay those of the CPU."""
    llm = LLM("default", dtype="float32", device="cuda", host_kv_cache_gb=0.05, block_size=8, num_kv_blocks=64)
    prompt = llm.encode(PROMPTS[3] * 3)
    first = greedy(llm, [prompt])[0]
    tiers, bm = llm.engine.kv_tiers, llm.engine.scheduler.block_manager
    for b in tiers.completed(wait=True):  # offload done: unpin, then drop the device prefix cache
        bm.release(b)
    bm.reset_prefix_cache()
    assert tiers.num_offloaded > 0
    assert greedy(llm, [prompt])[0] == first
    assert llm.engine.stats.tier_hit_tokens > 0


@pytest.mark.slow
@needs_cuda
def test_cuda_greedy_with_penalties_matches_cpu(cuda_llm):
    """Penalties on the device (scatter masks/counts, pinned non-blocking history copies) pick the CPU's tokens."""
    params = SamplingParams(temperature=0.0, repetition_penalty=1.3, frequency_penalty=0.5, presence_penalty=0.2,
                            max_tokens=N, ignore_eos=True)
    cpu = LLM("default", dtype="float32", device="cpu")
    assert greedy(cuda_llm, PROMPTS[:2], params) == greedy(cpu, PROMPTS[:2], params)


@needs_cuda
def test_cuda_soft_gemm_float32_is_not_tf32():
    """The soft partition's Triton GEMM in float32 keeps F.linear's precision (Triton's default is TF32)."""
    pytest.importorskip("triton")
    from nanoflow.kernels.triton_gemm import persistent_linear
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(64, 4096, device="cuda", generator=g)
    w = torch.randn(512, 4096, device="cuda", generator=g)
    torch.testing.assert_close(persistent_linear(x, w, num_sms=8), torch.nn.functional.linear(x, w),
                               rtol=1e-4, atol=1e-3)


@pytest.mark.slow
@needs_cuda
def test_cuda_trace_reaches_the_graphed_executor():
    """`nanoflow trace` on a GPU: trace/trace_steps set on the runner's (graphed) executor record a step."""
    llm = LLM("default", dtype="float32", device="cuda", executor="overlap", dense_batch=32)
    ex = llm.engine.runner.executor
    greedy(llm, PROMPTS[:2])  # shapes seen twice: graphs captured
    ex.trace, ex.trace_steps = [], []
    greedy(llm, PROMPTS[:2])
    assert ex.trace_steps and ex.trace
    ex.trace = None
    ex.close()
