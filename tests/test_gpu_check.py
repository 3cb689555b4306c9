"""benchmarks/gpu_check.sh (`make gpu-check`): the script parses, every nanoflow command it runs parses with the
real CLI, and its CPU mode runs the stages end to end (tiny: one trace, two bench runs, one of them failing on
purpose to show that the next stage still runs)."""
import json
import os
import shlex
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_check.sh")
pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="needs bash and coreutils timeout")


def _script(*args, env=None, timeout=120):
    return subprocess.run(["bash", SCRIPT, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})


def test_bash_syntax_and_help():
    assert subprocess.run(["bash", "-n", SCRIPT]).returncode == 0
    r = _script("--help")
    assert r.returncode == 0 and "GPU_CHECK_DEVICE" in r.stdout
    assert _script("--bogus").returncode == 2


@pytest.mark.parametrize("device", ["cuda", "cpu"])
def test_every_nanoflow_command_parses(device):
    """Each command line the script would run, parsed by the real `nanoflow` parser: a renamed option or a
    value of the wrong type fails here, not 5 minutes into a GPU run."""
    from nanoflow.bench import offline
    from nanoflow.cli import build_parser
    from nanoflow.flow import trace
    r = _script("--print-commands", env={"GPU_CHECK_DEVICE": device})
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 1 + 2 * 3  # one trace, dense batch x executor bench runs
    funcs = []
    for line in lines:
        argv = shlex.split(line)
        assert argv[0] == "nanoflow"
        args = build_parser().parse_args(argv[1:])  # SystemExit(2) on an unknown option or a bad value
        assert args.device == device and args.dtype == "bfloat16"
        assert args.executor in ("sequential", "nanobatch", "overlap")
        funcs.append(args.func)
        if args.func is offline.run:
            assert args.json and not args.compare  # no peers (no HF run on the CPU of a GPU machine)
            if device == "cuda":
                assert args.model == "dummy:llama-3-8b" and args.workload == "const:1024/512"
                assert args.dense_batch in (1024, 2048) and args.kv_cache_gb == 40
    assert funcs[0] is trace.run and funcs.count(offline.run) == 6
    assert os.path.isfile(os.path.join(ROOT, "tests", "test_device.py"))


def test_budget_skips_stages_and_says_so(tmp_path):
    r = _script(env={"GPU_CHECK_DEVICE": "cpu", "GPU_CHECK_STAGES": "trace", "GPU_CHECK_BUDGET_S": "5",
                     "OUT": str(tmp_path)})
    assert r.returncode == 0, r.stderr
    summary = (tmp_path / "summary.txt").read_text()
    assert "trace" in summary and "skipped" in summary


@pytest.mark.slow
def test_cpu_dry_run(tmp_path):
    """The CPU mode end to end (no nested pytest: too slow here): env, trace, and the bench stage with an
    executor that fails (a one-line error) before one that runs - the failure is recorded, the run goes on."""
    r = _script(env={"GPU_CHECK_DEVICE": "cpu", "GPU_CHECK_STAGES": "env,trace,bench",
                     "GPU_CHECK_DENSE_BATCHES": "32", "GPU_CHECK_EXECUTORS": "warp,sequential",
                     "OUT": str(tmp_path)}, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) <= 8 and {"summary.txt", "env.txt", "trace.json", "gantt.png", "bench.log",
                                "bench.json"} <= set(files), files
    summary = (tmp_path / "summary.txt").read_text()
    rows = {line.split()[0] + (" " + " ".join(line.split()[1:3]) if line.startswith("bench ") else ""): line
            for line in summary.splitlines() if line[:1].isalpha()}
    assert " ok " in rows["env"] and " ok " in rows["trace"] and "step " in rows["trace"]
    assert "FAILED" in rows["bench 32 warp"]
    assert " ok " in rows["bench 32 sequential"] and "% of optimal" in rows["bench 32 sequential"]
    runs = json.loads((tmp_path / "bench.json").read_text())["runs"]
    assert [(r["dense_batch"], r["executor"]) for r in runs] == [(32, "sequential")]
    assert runs[0]["results"][0]["total_tokens_per_s"] > 0
    assert "unknown executor" in (tmp_path / "bench.log").read_text() or \
        "executor must be" in (tmp_path / "bench.log").read_text()
