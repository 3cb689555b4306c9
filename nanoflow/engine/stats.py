"""What an engine counts per step: tokens, prefix/tier hits, and where the engine thread's and the device's
time goes (`LLMEngine.stats`; benchmarks read and reset it)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class StepStats:
    num_steps: int = 0
    prompt_tokens: int = 0  # prefill tokens computed (including recompute after preemption)
    generated_tokens: int = 0
    step_time_s: float = 0.0
    prefix_hit_tokens: int = 0  # prompt tokens whose KV was reused from device blocks (not computed)
    tier_hit_tokens: int = 0  # prompt tokens whose KV was reloaded from the host/disk tiers (not computed)
    # Where the engine thread's time goes (CPU) and how long the device sat idle between steps.
    schedule_s: float = 0.0  # Scheduler.schedule
    prepare_s: float = 0.0  # step metadata: token ids, positions, slots, block tables (runner.prepare)
    process_s: float = 0.0  # reading tokens back: append, detokenize, stop checks, outputs
    wait_s: float = 0.0  # engine thread blocked until the device finished a step
    device_busy_s: float = 0.0  # forward + sampling
    device_idle_s: float = 0.0  # gaps between consecutive steps while there was work

    def breakdown(self) -> dict[str, float]:
        """CPU ms per step by part and device idle %, for benchmarks."""
        n = max(1, self.num_steps)
        busy_idle = self.device_busy_s + self.device_idle_s
        return {"schedule_ms": 1e3 * self.schedule_s / n, "prepare_ms": 1e3 * self.prepare_s / n,
                "process_ms": 1e3 * self.process_s / n,
                "cpu_ms": 1e3 * (self.schedule_s + self.prepare_s + self.process_s) / n,
                "device_ms": 1e3 * self.device_busy_s / n,
                "device_idle_pct": 100.0 * self.device_idle_s / busy_idle if busy_idle else 0.0}
