"""The unit of data that moves between actors: plain, typed and small."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Trajectory:
    """One sampled Z for one prompt. State s_k is the prompt plus tokens[:k]."""

    record_id: int
    """The record (of the task's data) whose prompt Z continues."""

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

    reward_version: int = 0
    """Version of the reward that scored it (a reward that learns, like the M-step's, bumps it;
    replayed trajectories of an older version are scored again)."""

    end_allowed: list[bool] | None = None
    """Per state s_0..s_n, whether its prompt's text rule (`PromptRequest.end_rule`) lets it end,
    as the sampler judged it; None: its prompt has no such rule."""

    @property
    def length(self) -> int:
        return len(self.tokens)

    @property
    def sampled_log_q(self) -> float:
        """log q(Z ⊤) as the sampler drew it: its chosen tokens' log-probs (a tool's insertions add
        none) and its ending's (none when it was cut at max_len)."""
        return sum(self.logprobs) + (self.end_logprob or 0.0)

    @property
    def final_log_r(self) -> float:
        assert self.log_r is not None, "trajectory not scored yet"
        return self.log_r[-1]

    def key(self) -> tuple[int, ...]:
        return tuple(self.tokens)


def by_record(trajectories) -> dict[int, list[Trajectory]]:
    """The trajectories grouped by their record id, in first-seen order (each group in input order)."""
    groups: dict[int, list[Trajectory]] = {}
    for t in trajectories:
        groups.setdefault(t.record_id, []).append(t)
    return groups


def can_end_states(length: int, tool_mask: list[bool], min_len: int, end_only_after_tool: bool = False,
                   end_allowed: list[bool] | None = None) -> list[bool]:
    """For k = 0..length, whether state s_k (the prompt and the first k tokens) may end: k >= min_len,
    the next token is not a tool's (an environment step follows), with `end_only_after_tool`
    the last token ends a tool's insertion (arithmetic: right after a calculator result), and where
    `end_allowed` is given (a trajectory's text-rule verdicts, `actors.end_rules`) that says so. The
    one definition the samplers, the learner's teacher-forced pass and the scorer share."""
    mask = list(tool_mask) or [False] * length
    out = []
    for k in range(length + 1):
        ok = k >= min_len and not (k < length and mask[k])
        if end_only_after_tool:
            ok = ok and k > 0 and mask[k - 1]
        if end_allowed is not None:
            ok = ok and bool(end_allowed[k])
        out.append(ok)
    return out


@dataclass
class PromptRequest:
    """Samples wanted for one prompt: n at temperature 1, and one per tempered temperature."""

    record_id: int
    prompt_ids: list[int]
    n_on_policy: int
    temperatures: list[float] = field(default_factory=list)
    """One sampling temperature per tempered sample."""
    end_rule: dict | None = None
    """Where this prompt's Z may end, judged on its text (`actors.end_rules.WordRule` as a dict);
    None: no text rule."""

    @property
    def size(self) -> int:
        return self.n_on_policy + len(self.temperatures)


@dataclass
class SampleRequest:
    """What the learner asks one sampler for: several prompts and how to sample them. A sampler
    needs nothing else (it knows no task)."""

    prompts: list[PromptRequest]
    min_len: int
    max_len: int
    end_ids: list[int]
    tools: list[dict] = field(default_factory=list)
    """Tool settings (`sampler.tools` entries as dicts); tools fire during generation."""
    banned_ids: list[int] = field(default_factory=list)
    """Tokens the policy may not choose (masked out of its distribution before sampling)."""
    ban_penalty: float = float("inf")
    """How much the banned tokens' logits are lowered (infinite: masked out)."""
    first_banned_ids: list[int] = field(default_factory=list)
    """Tokens the policy may not choose as Z's first token (`task.first_token: word`: those that do
    not start a word), masked out of s_0 alone."""
    seed: int | None = None
    """Reseeds the engine's generator for this request, so that a request and a policy version
    determine its samples (exact resume)."""
    tag: int = 0
    """The driver's number for the request (step and micro-batch), echoed in the batch."""

    @property
    def end_only_after_tool(self) -> bool:
        """True when a tool lets the policy end only right after its insertion."""
        return any(tool.get("end_only_after", False) for tool in self.tools)

    def can_end(self, t: Trajectory) -> list[bool]:
        """Whether each state s_0..s_n of t may end under this request's rules (`can_end_states`)."""
        return can_end_states(t.length, t.tool_mask, self.min_len, self.end_only_after_tool, t.end_allowed)

    def prompt_ids(self, record_id: int) -> list[int]:
        for p in self.prompts:
            if p.record_id == record_id:
                return p.prompt_ids
        raise KeyError(f"record {record_id} is not among this request's prompts")


@dataclass
class MicroBatch:
    """What the learner trains on: scored trajectories and the request they answer. The request
    carries each record's prompt, the end and banned tokens and which states may end, so the
    teacher-forced pass applies the very rules the sampler did and never asks the task again."""

    request: SampleRequest
    trajectories: list[Trajectory]

    def __len__(self) -> int:
        return len(self.trajectories)

    def __iter__(self):
        return iter(self.trajectories)

    def subset(self, trajectories: list[Trajectory]) -> "MicroBatch":
        return MicroBatch(self.request, trajectories)


def joined(batches: list[MicroBatch]) -> MicroBatch:
    """One micro-batch of several (PPO reshuffles a step's trajectories into its own minibatches):
    their trajectories, and the first request's rules with every request's prompts."""
    first = batches[0].request
    prompts = list({p.record_id: p for b in batches for p in b.request.prompts}.values())
    request = SampleRequest(prompts, first.min_len, first.max_len, first.end_ids, first.tools, first.banned_ids,
                            first.ban_penalty, first.first_banned_ids, first.seed, first.tag)
    return MicroBatch(request, [t for b in batches for t in b.trajectories])


@dataclass
class SampledBatch:
    """Fresh trajectories of a request's prompts, the policy version that made them, and timings."""

    trajectories: list[Trajectory]
    version: int
    worker: str
    sample_seconds: float = 0.0
    score_seconds: float = 0.0
    tag: int = 0
    """The request's tag."""
    plan: tuple | None = None
    """(request, replay counts) of the request that made it, attached by the Ray driver when the batch
    arrives (the replayed share the learner then draws); None on the actors' side."""

    @property
    def record_ids(self) -> list[int]:
        return list(dict.fromkeys(t.record_id for t in self.trajectories))
