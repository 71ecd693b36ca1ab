"""The unit of data that moves between actors: plain, typed and small."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Trajectory:
    """One sampled Z for one prompt. State s_k is the prompt plus tokens[:k]."""

    prompt_id: int
    """Index of the prompt in the task's prompt list."""

    tokens: list[int]
    """Generated tokens of Z, without the terminating token."""

    terminated: bool = True
    """True when the policy chose ⊤ itself; False when it was cut at max length."""

    logprobs: list[float] = field(default_factory=list)
    """Behaviour log-probs of `tokens` under the sampling distribution (tempered); 0 for tool tokens."""

    end_logprob: float | None = None
    """Behaviour log-prob of the terminating token, when one was sampled."""

    tool_mask: list[bool] = field(default_factory=list)
    """True where the token was inserted by a tool (an environment step). Empty means none."""

    temperature: float = 1.0
    """Sampling temperature (1.0 on-policy; NaN for trajectories that were not sampled)."""

    version: int = 0
    """Policy version that produced it (-1 for seeded trajectories)."""

    source: str = "on_policy"
    """'on_policy', 'tempered', 'replay' or 'seed'."""

    log_r: list[float] | None = None
    """Untempered log R(s_k ⊤) for k = 0..len(tokens), filled by the reward."""

    @property
    def length(self) -> int:
        return len(self.tokens)

    @property
    def final_log_r(self) -> float:
        assert self.log_r is not None, "trajectory not scored yet"
        return self.log_r[-1]

    def key(self) -> tuple[int, ...]:
        return tuple(self.tokens)


@dataclass
class SampleRequest:
    """What the learner asks one sampler for."""

    prompt_id: int
    n_on_policy: int
    temperatures: list[float] = field(default_factory=list)
    """One sampling temperature per tempered sample."""


@dataclass
class SampledBatch:
    """Fresh trajectories of one prompt, the policy version that made them, and timings."""

    trajectories: list[Trajectory]
    version: int
    worker: str
    sample_seconds: float = 0.0
    score_seconds: float = 0.0

    @property
    def prompt_id(self) -> int:
        return self.trajectories[0].prompt_id if self.trajectories else -1
