"""Prioritized replay: per prompt, the top-k trajectories by log R, near-duplicates rejected."""

from __future__ import annotations

import copy
import math
import random
from collections import Counter
from dataclasses import asdict

from .trajectory import Trajectory


def edit_distance(a: tuple[int, ...], b: tuple[int, ...], limit: int | None = None) -> int:
    """Levenshtein distance between two token sequences. With `limit`, the answer is exact when it
    is below the limit, and some value >= limit otherwise: only a band of width `limit` around the
    diagonal is computed, and rows stop as soon as the whole band is at the limit (Ukkonen's cut-off),
    so near-duplicate checks cost O(L · limit) instead of O(L²)."""
    if len(a) < len(b):
        a, b = b, a
    if limit is not None and len(a) - len(b) >= limit:
        return limit
    big = len(a) + len(b) + 1
    band = big if limit is None else limit
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        lo, hi = max(1, i - band), min(len(b), i + band)
        cur = [big] * (len(b) + 1)
        cur[0] = i
        for j in range(lo, hi + 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != b[j - 1]))
        if limit is not None and min(cur[max(0, lo - 1): hi + 1]) >= limit:
            return limit
        prev = cur
    return prev[-1] if limit is None else min(prev[-1], limit)


class Replay:
    """Keeps untempered per-prefix log R; the current reward temperature is applied on read."""

    def __init__(self, capacity_per_prompt: int = 50, dedup_fraction: float = 0.25, sampling: str = "softmax", seed: int = 0,
                 metrics=None):
        self.metrics = metrics
        """Optional `cluster.metrics.Metrics`; the replay's figures go out labelled actor=replay."""
        self.capacity = capacity_per_prompt
        self.dedup_fraction = dedup_fraction
        self.sampling = sampling
        self.rng = random.Random(seed)
        self.buffers: dict[int, list[Trajectory]] = {}
        self.added = 0
        self.rejected = 0
        self._bags: dict[tuple[int, ...], Counter] = {}  # token multisets of kept trajectories

    def _bag(self, t: Trajectory) -> Counter:
        key = t.key()
        bag = self._bags.get(key)
        if bag is None:
            bag = self._bags[key] = Counter(key)
        return bag

    def _near(self, a: Trajectory, b: Trajectory, bag_a: Counter | None = None) -> bool:
        if a.tokens == b.tokens:
            return True
        limit = self.dedup_fraction * (a.length + b.length)
        if limit <= 0 or abs(a.length - b.length) >= limit:
            return False
        # every edit changes the multiset of tokens by at most 2: half the multiset difference is a
        # lower bound of the edit distance, in O(L), and rules out most pairs without the DP
        shared = sum(((bag_a if bag_a is not None else Counter(a.key())) & self._bag(b)).values())
        if (a.length + b.length - 2 * shared) / 2 >= limit:
            return False
        return edit_distance(a.key(), b.key(), limit=math.ceil(limit)) < limit

    def add(self, trajectories: list[Trajectory]) -> int:
        """Offer scored trajectories; returns how many were kept."""
        kept = 0
        for t in trajectories:
            if t.log_r is None:
                raise ValueError("replay.add: trajectory has no log_r; score it first")
            buf = self.buffers.setdefault(t.record_id, [])
            bag = Counter(t.key())
            near = [u for u in buf if self._near(t, u, bag)]
            if any(u.final_log_r >= t.final_log_r for u in near):
                self.rejected += 1
                continue
            if len(buf) - len(near) >= self.capacity and buf[-1].final_log_r >= t.final_log_r:
                self.rejected += 1
                continue
            entry = copy.copy(t)
            entry.tokens, entry.log_r = list(t.tokens), list(t.log_r)
            buf[:] = [u for u in buf if u not in near]
            buf.append(entry)
            buf.sort(key=lambda u: -u.final_log_r)
            for gone in buf[self.capacity:] + near:
                self._bags.pop(gone.key(), None)
            del buf[self.capacity :]
            kept += 1
        self.added += kept
        if self.metrics is not None:
            self.metrics.get("gfnlm_replay_offered_total", actor="replay").inc(len(trajectories))
            self.metrics.get("gfnlm_replay_admitted_total", actor="replay").inc(kept)
            self.metrics.get("gfnlm_replay_size", actor="replay").set(self.size())
        return kept

    def refresh(self, trajectories: list[Trajectory]) -> int:
        """Write back log R and reward version of rescored copies (a reward that learns, the
        M-step's, changed since they were added): the kept entry with the same record and tokens
        takes them, and its buffer is ordered by the new rewards, so priorities, eviction and
        near-duplicate checks compare rewards of one version. Returns how many entries changed."""
        records, count = set(), 0
        for t in trajectories:
            for u in self.buffers.get(t.record_id, []):
                if u.tokens == t.tokens and (u.log_r != t.log_r or u.reward_version != t.reward_version):
                    u.log_r, u.reward_version = list(t.log_r), t.reward_version
                    records.add(t.record_id)
                    count += 1
                    break
        for rid in records:
            self.buffers[rid].sort(key=lambda u: -u.final_log_r)
        return count

    def size(self, record_id: int | None = None) -> int:
        if record_id is None:
            return sum(len(b) for b in self.buffers.values())
        return len(self.buffers.get(record_id, []))

    def sizes(self, record_ids: list[int]) -> list[int]:
        """How many trajectories each record's buffer holds (the Ray driver plans batches with it)."""
        return [self.size(r) for r in record_ids]

    def sample(self, record_id: int, n: int, reward_temperature: float = 1.0) -> list[Trajectory]:
        """n trajectories, uniformly or by softmax(log R / T), with replacement; a buffer holding
        n or fewer gives each of its trajectories once."""
        out = self._sample(record_id, n, reward_temperature)
        if self.metrics is not None and n > 0:
            self.metrics.get("gfnlm_replay_requested_total", actor="replay").inc(n)
            self.metrics.get("gfnlm_replay_served_total", actor="replay").inc(len(out))
            self.metrics.get("gfnlm_replay_hit_rate", actor="replay").set(len(out) / n)
        return out

    def sample_many(self, wanted: list[tuple[int, int]], reward_temperature: float = 1.0) -> list[Trajectory]:
        """`sample` for several (record, n) pairs in one call (one round trip to a replay actor)."""
        out = []
        for rid, n in wanted:
            out += self.sample(rid, n, reward_temperature)
        return out

    def _sample(self, record_id: int, n: int, reward_temperature: float) -> list[Trajectory]:
        buf = self.buffers.get(record_id, [])
        if not buf or n <= 0:
            return []
        if n >= len(buf):
            picks = list(range(len(buf)))
        elif self.sampling == "uniform":
            picks = [self.rng.randrange(len(buf)) for _ in range(n)]
        else:
            logits = [u.final_log_r / reward_temperature for u in buf]
            top = max(logits)
            weights = [math.exp(x - top) for x in logits]
            picks = self.rng.choices(range(len(buf)), weights=weights, k=n)
        out = []
        for i in picks:
            t = copy.copy(buf[i])
            t.source = "replay"
            out.append(t)
        return out

    def state_dict(self) -> dict:
        return {
            "buffers": {k: [asdict(t) for t in v] for k, v in self.buffers.items()},
            "rng": self.rng.getstate(),
            "added": self.added,
            "rejected": self.rejected,
        }

    def load_state_dict(self, state: dict) -> None:
        self.buffers = {int(k): [Trajectory(**t) for t in v] for k, v in state["buffers"].items()}
        self.rng.setstate(state["rng"])
        self.added, self.rejected = state["added"], state["rejected"]
