"""One EngineConfig passed whole: the scheduler's part of it, `plan="auto"` resolved before an engine exists,
the shared model arguments of every command, the C++-kernel switch per engine, the one cache directory."""
import argparse

import pytest

from nanoflow.config import EngineConfig


def test_scheduler_config_from_engine_config():
    from nanoflow.engine.scheduler import SchedulerConfig
    cfg = EngineConfig(dense_batch=48, max_num_seqs=7, block_size=8, admission_control=False, prefix_caching=False,
                       device="cpu")
    sc = SchedulerConfig.from_engine_config(cfg, max_model_len=100, num_blocks=33, cache_salt=b"s")
    assert (sc.dense_batch, sc.max_num_seqs, sc.block_size, sc.admission_control, sc.prefix_caching) == \
        (48, 7, 8, False, False)
    assert (sc.max_model_len, sc.num_blocks, sc.cache_salt) == (100, 33, b"s")


def test_engine_constructor_does_not_tune():
    from nanoflow.autosearch.search import resolve_auto_plan
    from nanoflow.engine.engine import LLMEngine
    with pytest.raises(ValueError, match="resolve"):
        LLMEngine(EngineConfig(executor="overlap", plan="auto", device="cpu"))
    plain = EngineConfig(executor="overlap", plan="p.json", device="cpu")
    assert resolve_auto_plan(plain) is plain
    assert resolve_auto_plan(EngineConfig(plan="auto", device="cpu")).plan is None  # sequential runs no plan


def test_flow_does_not_import_autosearch():
    import pathlib
    import nanoflow.flow
    for f in pathlib.Path(nanoflow.flow.__file__).parent.glob("*.py"):
        assert "autosearch" not in f.read_text(), f


@pytest.mark.parametrize("command", ["profile", "tune", "roofline", "generate"])
def test_model_arguments_share_the_engine_defaults(command):
    from nanoflow.autosearch import commands
    from nanoflow.config import add_engine_arguments
    from nanoflow.costmodel import roofline
    add = {"profile": commands.add_profile_arguments, "tune": commands.add_tune_arguments,
           "roofline": roofline.add_arguments, "generate": add_engine_arguments}[command]
    p = argparse.ArgumentParser()
    add(p)
    args = p.parse_args([])
    assert (args.model, args.dtype, args.dense_batch) == ("default", "auto", None)
    assert getattr(args, "device", "auto") == "auto"


def test_cache_dir_is_one_place(tmp_path, monkeypatch):
    from nanoflow import env
    from nanoflow.autosearch.profile import cache_path
    from nanoflow.costmodel.peak import default_cache_path
    from nanoflow.engine.kv_tiers import KVTiers
    import torch
    monkeypatch.setenv("NANOFLOW_CACHE_DIR", str(tmp_path))
    assert env.cache_dir("kv") == str(tmp_path / "kv")
    assert default_cache_path() == str(tmp_path / "peak.json")
    assert cache_path("plans", {"a": 1}).startswith(str(tmp_path / "plans"))
    tiers = KVTiers([torch.zeros(2, 4, 2, 1, 4)], host_bytes=1 << 20, disk_bytes=1 << 20)
    try:
        assert str(tiers.disk.dir) == str(tmp_path / "kv")
    finally:
        tiers.close(persist=False)
    monkeypatch.delenv("NANOFLOW_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert env.cache_dir("kv") == str(tmp_path / "xdg" / "nanoflow" / "kv")


@pytest.mark.slow
@pytest.mark.slow  # two default-model engines
def test_cpp_kernel_switch_is_per_engine():
    from nanoflow import LLM, SamplingParams
    from nanoflow.kernels import cpu_ext
    default = cpu_ext.enabled()
    seen = {}
    engines = {flag: LLM("default", dtype="float32", dense_batch=32, cpp_kernels=flag) for flag in (False, True)}
    for flag, llm in engines.items():
        runner = llm.engine.runner
        inner = runner.executor

        def spy(*a, flag=flag, inner=inner):
            seen[flag] = cpu_ext.enabled()
            return inner(*a)
        runner.executor = spy
    params = SamplingParams(temperature=0.0, max_tokens=2)
    for flag in (False, True, False):  # interleaved: neither engine's setting leaks into the other
        engines[flag].generate([[1, 504, 3458]], params, use_tqdm=False)
        assert seen[flag] == (flag and default)
    assert cpu_ext.enabled() == default


def test_cpp_kernel_switch_is_per_thread():
    """Two engines stepping at once on different threads each see their own C++-kernel choice."""
    import threading

    from nanoflow.kernels import cpu_ext
    seen, barrier = {}, threading.Barrier(2)

    def step(name: str, flag: bool) -> None:
        with cpu_ext.switched(flag):
            barrier.wait()  # both inside their switch at the same time
            seen[name] = cpu_ext.enabled()
            barrier.wait()

    threads = [threading.Thread(target=step, args=("off", False)), threading.Thread(target=step, args=("on", True))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen["off"] is False
    assert seen["on"] is (not cpu_ext._env_off)


def test_cpp_kernel_switch_reaches_the_overlap_units():
    """The overlap executor's unit threads run a step's tasks under the stepping engine's C++-kernel choice."""
    from nanoflow.flow.cpu_units import CpuUnits
    from nanoflow.flow.executor import NanoTask, Program
    from nanoflow.flow.plan import Unit
    from nanoflow.kernels import cpu_ext
    units = CpuUnits([Unit("compute", ["compute"], 0.5), Unit("memory", ["memory"], 0.5)])
    tasks = [[NanoTask(0, "qkv", 0, 0, 1, True, u, ())] for u in (0, 1)]
    seen = []
    try:
        with cpu_ext.switched(False):
            units.run(Program(["compute", "memory"], tasks), lambda task: seen.append(cpu_ext.enabled()))
    finally:
        units.close()
    assert seen == [False, False]
