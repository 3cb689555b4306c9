"""A data-parallel engine's `scheduler` as its readers see it (the config; the server's gauges): the
replicas' latest snapshots (dp_worker.ReplicaSnapshot) summed."""
from __future__ import annotations

from types import SimpleNamespace

from nanoflow.engine.scheduler import SchedulerConfig


class SchedulerView:
    """What readers of `engine.scheduler` use, summed over the live replicas (data_parallel.Replica)."""

    def __init__(self, config: SchedulerConfig, replicas: list) -> None:
        self.config, self._replicas = config, replicas

    def _sum(self, name: str) -> int:
        return sum(getattr(r.snapshot, name) for r in self._replicas if r.alive and r.snapshot is not None)

    @property
    def waiting(self) -> range:  # (only its length is read)
        return range(self._sum("num_waiting"))

    @property
    def running(self) -> range:
        return range(self._sum("num_running"))

    @property
    def num_preemptions(self) -> int:
        return sum(r.snapshot.num_preemptions for r in self._replicas if r.snapshot is not None)

    @property
    def block_manager(self):
        total = self.config.num_blocks * max(1, sum(r.alive for r in self._replicas))
        free = self._sum("num_free_blocks") if any(r.snapshot for r in self._replicas) else total
        return SimpleNamespace(num_blocks=total, num_free_blocks=free, usage=1.0 - free / total)
