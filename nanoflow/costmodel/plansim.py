"""Step time of the sequential, nanobatch and overlap plans predicted from the cost model (a simulation, not a
measurement): the roofline's per-operation compute / memory / network times (`costmodel.op_breakdown`) for
one iteration, arranged as each plan runs them.

- sequential: one operation at a time, each as long as its slowest resource: sum of max(c, m, n).
- nanobatch (2 nano-batches, no overlap): the same, except that a GEMM reads its weights once per nano-batch,
  so its memory time doubles (activations are a small part of a GEMM's bytes at B_dense >= 1024).
- overlap (2 nano-batches on compute / memory / network units): ideal overlap, no interference: as long as
  the busiest resource's total. The gap between this and a measured run is what NanoFlow attributes to
  kernel interference and imperfect pipelining (its Fig. 10: 68.5% compute utilisation).
"""
from __future__ import annotations

from dataclasses import dataclass

from nanoflow.costmodel.analysis import OpCost

GEMMS = ("KQV", "O", "UG", "D", "LMHead")
# The paper's measured LLaMA-2-70B, 8 x A100 numbers, tok/s/GPU: Fig. 9 ablation (sequential "non-overlap",
# "nanobatch-only", NanoFlow) and Fig. 7 (NanoFlow), per constant workload.
PAPER_70B = {"512/512": {"sequential": 1106, "nanobatch": 982, "overlap": 1323, "fig7": 1286},
             "1024/512": {"sequential": 1092, "nanobatch": 958, "overlap": 1291, "fig7": 1263},
             "512/1024": {"sequential": 1048, "nanobatch": 952, "overlap": 1277, "fig7": 1212}}


@dataclass
class PlanPrediction:
    plan: str
    step_ms: float  # one iteration (all layers) on all devices together, like the roofline table
    tokens_per_s_per_device: float


def predict_plans(ops: list[OpCost], dense_batch: float, num_devices: int) -> list[PlanPrediction]:
    def nano(o: OpCost) -> tuple[float, float, float]:
        m = 2 * o.t_mem_ms if o.name in GEMMS else o.t_mem_ms
        return o.t_compute_ms, m, o.t_net_ms
    seq = sum(max(o.t_compute_ms, o.t_mem_ms, o.t_net_ms) for o in ops)
    split = [nano(o) for o in ops]
    nanobatch = sum(max(t) for t in split)
    overlap = max(sum(t[k] for t in split) for k in range(3))
    # The roofline's times are for the aggregate of the devices (all FLOPs / all devices' FLOP/s): wall times.
    return [PlanPrediction(name, ms, dense_batch / (ms / 1e3) / num_devices)
            for name, ms in (("sequential", seq), ("nanobatch", nanobatch), ("overlap", overlap))]


def print_predictions(preds: list[PlanPrediction], optimal_per_device: float, paper: dict | None) -> None:
    from rich.console import Console
    from rich.table import Table
    table = Table(title="Plans predicted from the cost model (a simulation: ideal overlap, no interference)")
    for col in ("plan", "iteration ms", "tok/s/device", "% of Eq. 5 optimum", "paper, measured",
                "predicted / paper"):
        table.add_column(col, justify="left" if col == "plan" else "right")
    for p in preds:
        measured = (paper or {}).get(p.plan)
        table.add_row(p.plan, f"{p.step_ms:,.1f}", f"{p.tokens_per_s_per_device:,.0f}",
                      f"{100 * p.tokens_per_s_per_device / optimal_per_device:.1f}%",
                      f"{measured:,}" if measured else "-",
                      f"{p.tokens_per_s_per_device / measured:.2f}x" if measured else "-")
    Console().print(table)
    if paper:
        Console().print(f"paper Fig. 7 (NanoFlow, this workload): {paper['fig7']} tok/s/GPU; Fig. 9 ablation in "
                        f"the table. The prediction uses the datasheet GEMM peak and no interference, so it is an "
                        f"upper bound; the measured/predicted gap is NanoFlow's kernel interference and pipeline "
                        f"bubbles.")
