"""`nanoflow roofline`: the paper's cost model for one model on one machine, as a table.

Table 1 hardware uses datasheet numbers; `cpu` / `cuda` measure this machine's GEMM peak at the
model's shapes (Eq. 5 wants the measured peak) and its memory bandwidth.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from nanoflow.config import add_model_arguments, preferred_dtype
from nanoflow.models.config import PRESETS, ModelConfig
from nanoflow.costmodel.analysis import PAPER_MODELS, WORKLOADS, Roofline, analyze, classify
from nanoflow.costmodel.hardware import TABLE1, Hardware, get_hardware

DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
MEASURED = ("cpu", "cuda")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser, device=False)  # --model (also a preset name), --dtype, --dense-batch
    parser.add_argument("--hardware", default="cpu",
                        help=f"'cpu' or 'cuda' (measured here) or a Table 1 name: {', '.join(TABLE1)}")
    parser.add_argument("--num-devices", type=int, default=1, help="devices under tensor parallelism")
    parser.add_argument("--workload", default="const:512/512",
                        help="const:IN/OUT or a Table 4 dataset (lmsys, splitwise, sharegpt)")
    parser.add_argument("--params", type=float, default=None,
                        help="override P_model, e.g. 70e9 for the paper's nominal LLaMA-2-70B")
    parser.add_argument("--peak-seconds", type=float, default=1.0, help="GEMM measuring budget")
    parser.add_argument("--refresh", action="store_true", help="re-measure instead of using the cache")
    parser.add_argument("--json", metavar="FILE", default=None, help="also write the numbers as JSON")
    parser.add_argument("--plans", action="store_true",
                        help="also predict the sequential / nanobatch / overlap plans' step time from the cost "
                             "model (a simulation) and compare with the paper's LLaMA-2-70B numbers")


def resolve_model_config(spec: str) -> tuple[ModelConfig, float | None]:
    """ModelConfig and, for MoE paper shapes, the stored parameter count (all experts). Besides what every
    `--model` takes (models.loader), a bare preset or paper-model name: only shapes are needed here."""
    name = spec.removeprefix("dummy:")
    if name in PRESETS:
        spec = f"dummy:{name}"
    elif name in PAPER_MODELS:  # shapes the paper evaluates that have no runnable preset
        pm = PAPER_MODELS[name]
        return pm.cfg, (pm.weight_params if pm.weight_params != pm.params else None)
    from nanoflow.models.loader import load_config, resolve_model
    try:
        return load_config(resolve_model(spec)), None
    except FileNotFoundError as e:
        if os.path.exists(spec):
            raise
        known = sorted(set(PRESETS) | set(PAPER_MODELS))
        raise FileNotFoundError(f"{e}; or a preset name: {', '.join(known)}") from None


def parse_workload(spec: str) -> tuple[float, float]:
    """'const:512/1024' -> (512, 1024); dataset names give Table 4 means."""
    key = spec.strip().lower()
    if key in ("lmsys", "splitwise", "sharegpt"):
        return WORKLOADS[key]
    key = key.removeprefix("const:")
    try:
        p, d = (float(v) for v in key.split("/"))
    except ValueError:
        raise ValueError(f"bad workload {spec!r}: use const:IN/OUT or one of lmsys, splitwise, "
                         "sharegpt") from None
    if p < 0 or d <= 0:
        raise ValueError(f"bad workload {spec!r}: need IN >= 0 and OUT > 0")
    return p, d


def measured_hardware(kind: str, cfg: ModelConfig, dtype: str, m: int, seconds: float,
                      refresh: bool) -> Hardware:
    """This machine: GEMM peak at the model's shapes with M = m, copy bandwidth, memory size."""
    import torch

    from nanoflow.costmodel.peak import measure_gemm_peak, measure_mem_bandwidth
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--hardware cuda: no CUDA device available")
        mem = torch.cuda.get_device_properties(0).total_memory
        name = f"cuda ({torch.cuda.get_device_name(0)}, measured)"
    else:
        mem = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        name = f"cpu ({torch.get_num_threads()} threads, measured)"
    tdtype = getattr(torch, dtype)
    flops = measure_gemm_peak(cfg, tdtype, m, seconds=seconds, refresh=refresh, device=kind)
    bw = measure_mem_bandwidth(seconds=min(0.5, seconds), refresh=refresh, device=kind)
    return Hardware(name, mem / 1e9, bw / 1e9, 0.0, flops / 1e9)


def run(args: argparse.Namespace) -> int:
    try:
        cfg, weight_params = resolve_model_config(args.model)
        p, d = parse_workload(args.workload)
        hw_name = args.hardware.lower()
        measured = hw_name in MEASURED
        if args.dtype == "auto":  # the S_type of the engine's default on that hardware
            args.dtype = preferred_dtype("cpu" if hw_name == "cpu" else "cuda")
        if args.dtype not in DTYPE_BYTES:
            raise ValueError(f"unsupported dtype {args.dtype!r}; choose auto or one of {', '.join(DTYPE_BYTES)}")
        batch = args.dense_batch or (256 if hw_name == "cpu" else 2048)
        if batch < 1 or args.num_devices < 1:
            raise ValueError("--dense-batch and --num-devices must be >= 1")
        if measured and args.num_devices != 1:
            raise ValueError(f"--hardware {hw_name} measures one device (no interconnect); "
                             "use a Table 1 name for --num-devices > 1")
        hw = (measured_hardware(hw_name, cfg, args.dtype, batch, args.peak_seconds, args.refresh)
              if measured else get_hardware(args.hardware, args.num_devices))
    except (ValueError, FileNotFoundError) as e:
        print(f"nanoflow roofline: error: {e}", file=sys.stderr)
        return 2
    report = analyze(cfg, hw, batch, p, d, DTYPE_BYTES[args.dtype], params=args.params,
                     weight_params=weight_params)
    print_report(report, hw, args.dtype, measured)
    if args.plans:
        from nanoflow.costmodel.plansim import PAPER_70B, predict_plans, print_predictions
        paper = PAPER_70B.get(f"{p:g}/{d:g}") if cfg.name == "llama-2-70b" and hw.num_devices == 8 else None
        print_predictions(predict_plans(report.ops, batch, hw.num_devices), report.optimal_per_device, paper)
    if args.json:
        out = dict(report.to_dict(), dtype=args.dtype, peak_source="measured" if measured else "datasheet",
                   hardware_spec=dict(vars(hw)))
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return 0


def _fmt(x: float | None, digits: int = 2) -> str:
    if x is None or x != x or x in (float("inf"), float("-inf")):
        return "n/a"
    return f"{x:,.{digits}f}"


def print_report(r: Roofline, hw: Hardware, dtype: str, measured: bool) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    console.print(f"[bold]Roofline[/]: {r.model or 'model'} on {r.num_devices} x {hw.name}, {dtype} "
                  f"(S_type={r.dtype_bytes} B), B_dense={r.dense_batch:g}, "
                  f"workload {r.prompt_len:g}/{r.decode_len:g}")
    ops = Table(title=f"One iteration, all layers, summed over {r.num_devices} device(s); times in ms")
    for col in ("Op", "GFLOP", "Mem GB", "Net GB", "T_comp", "T_mem", "T_net", "Bound"):
        ops.add_column(col, justify="left" if col in ("Op", "Bound") else "right")
    for o in r.ops:
        ops.add_row(o.name, _fmt(o.gflop, 1), _fmt(o.mem_gb, 1), _fmt(o.net_gb, 1), _fmt(o.t_compute_ms),
                    _fmt(o.t_mem_ms), _fmt(o.t_net_ms), o.bound.removesuffix("-bound") if o.t_ms > 0 else "-")
    t = r.op_totals()
    ops.add_section()
    ops.add_row("[bold]Total", "", "", "", _fmt(t["t_compute_ms"]), _fmt(t["t_mem_ms"]), _fmt(t["t_net_ms"]),
                classify(t["t_compute_ms"], t["t_mem_ms"], t["t_net_ms"]).removesuffix("-bound"))
    console.print(ops)

    summ = Table(title="Cost model (paper §3)", show_header=False)
    summ.add_column("quantity")
    summ.add_column("value", justify="right")
    src = "measured" if measured else "datasheet"
    rows = [
        ("Compute per device", f"{hw.compute_gflops / 1e3:,.2f} TFLOP/s ({src})"),
        ("MemBW per device / MemSize per device", f"{hw.mem_bw_gbs:,.0f} GB/s / {hw.mem_size_gb:,.0f} GB"),
        ("P_model (GEMM params per token)", f"{r.params / 1e9:,.3f} B"),
        ("T_compute (Eq. 2)", f"{_fmt(r.t_compute_s * 1e3)} ms"),
        ("T_mem (Eq. 1)", f"{_fmt(r.t_mem_s * 1e3)} ms"),
        ("T_net (Eq. 3)", "n/a (measured, one device)" if measured else f"{_fmt(r.t_net_s * 1e3)} ms"),
        ("Bound (Eq. 1-3)", r.bound),
        ("T_R = T_mem / T_compute (Eq. 4)", _fmt(r.t_r, 3)),
        ("T_net / T_compute", _fmt(r.net_over_compute, 3)),
        ("KV capacity (tokens)", _fmt(r.kv_capacity_tokens, 0)),
        ("Steady-state B_dense from KV capacity", _fmt(r.steady_dense_batch, 0)),
        ("T_R at steady-state B_dense", _fmt(r.t_r_steady, 3)),
        ("Optimal throughput (Eq. 5), per device", f"{_fmt(r.optimal_per_device, 0)} tok/s"),
        ("Optimal throughput (Eq. 5), total", f"{_fmt(r.optimal_total, 0)} tok/s"),
    ]
    for k, v in rows:
        summ.add_row(k, v)
    console.print(summ)
