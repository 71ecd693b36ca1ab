"""The Driver protocol: what the loop, checkpoints and reporting ask of a driver. LocalDriver
(loop.py, every piece in this process) and RayDriver (distributed.py, actors) implement it without
importing each other."""

from __future__ import annotations

from typing import Protocol

from gfnlm.actors.trajectory import Trajectory


class Driver(Protocol):
    c: object
    """The run's pieces (`components.Components`): config, task, policy, learner, scheduler ..."""
    counters: dict[str, float]
    """Running counts reported with every step (batches dropped, actor failures, broadcast bytes ...)."""
    run_dir: str | None
    """The run folder, set by the loop before the first step."""

    def start(self) -> None:
        """Begin sampling (Ray: send the first requests); called after a restore."""

    def step(self, temperature: float) -> tuple[list[Trajectory], dict]:
        """One optimizer step at reward temperature T: (the fresh trajectories, the update's figures)."""

    def metrics_endpoints(self) -> dict[str, str]:
        """actor -> host:port of its Prometheus endpoint."""

    def replay_state(self) -> dict:
        """The replay buffers, for a checkpoint."""

    def load_replay_state(self, state: dict) -> None:
        """Put checkpointed replay buffers back."""

    def replay_size(self) -> int:
        """Trajectories held by the replay."""

    def in_flight_plans(self) -> list[dict]:
        """Requests sent but not yet trained on, for a checkpoint (none in one process)."""

    def restore_plans(self, plans: list[dict]) -> None:
        """Send again the requests a checkpoint held in flight."""

    def close(self) -> None:
        """Stop what the driver started."""


MEMBERS = ("c", "counters", "run_dir", "start", "step", "metrics_endpoints", "replay_state", "load_replay_state",
           "replay_size", "in_flight_plans", "restore_plans", "close")
"""Every member of `Driver`; tests/test_layers.py holds both drivers to it."""
