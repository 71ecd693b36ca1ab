"""The prioritized replay buffer."""

import math

import pytest

from actors.replay import Replay, edit_distance
from actors.trajectory import Trajectory


def traj(tokens, log_r, prompt_id=0):
    return Trajectory(prompt_id, list(tokens), log_r=[0.0] * len(tokens) + [log_r])


def test_edit_distance():
    assert edit_distance((1, 2, 3), (1, 2, 3)) == 0
    assert edit_distance((1, 2, 3), (1, 3)) == 1
    assert edit_distance((), (4, 5)) == 2
    assert edit_distance((1, 2, 3, 4), (2, 1, 3, 5)) == 3


def test_keeps_top_k_per_prompt():
    r = Replay(capacity_per_prompt=3, dedup_fraction=0.0)
    r.add([traj([i], -i) for i in range(6)] + [traj([9], -1.0, prompt_id=1)])
    assert sorted(t.final_log_r for t in r.buffers[0]) == [-2, -1, 0]
    assert r.size(0) == 3 and r.size(1) == 1 and r.size() == 4
    # a worse one than all kept is refused when full; a better one evicts the worst
    assert r.add([traj([7], -5)]) == 0
    assert r.add([traj([8], 5)]) == 1
    assert sorted(t.final_log_r for t in r.buffers[0]) == [-1, 0, 5]


def test_near_duplicates_keep_the_better():
    r = Replay(capacity_per_prompt=10, dedup_fraction=0.25)
    r.add([traj([1, 2, 3, 4, 5, 6, 7, 8], -3.0)])
    # one substitution in 8 tokens: distance 1 < 0.25 * 16 = 4 -> near-duplicate, worse: refused
    assert r.add([traj([1, 2, 3, 4, 5, 6, 7, 9], -4.0)]) == 0
    # better: replaces the kept one
    assert r.add([traj([1, 2, 3, 4, 5, 6, 7, 9], -1.0)]) == 1
    assert [t.tokens[-1] for t in r.buffers[0]] == [9]
    # far enough: both kept
    assert r.add([traj([5, 5, 5, 5, 1, 1, 1, 1], -9.0)]) == 1
    assert r.size(0) == 2
    # exact repeats are duplicates even with dedup_fraction 0
    r0 = Replay(dedup_fraction=0.0)
    r0.add([traj([1], -1.0), traj([1], -1.0), traj([2], -1.0)])
    assert r0.size() == 2


def test_sampling_follows_softmax_of_tempered_log_r():
    r = Replay(capacity_per_prompt=10, dedup_fraction=0.0, sampling="softmax", seed=0)
    r.add([traj([1], 0.0), traj([2], -math.log(3))])  # weights 3 : 1
    picks = r.sample(0, 4000, reward_temperature=1.0)
    frac = sum(t.tokens == [1] for t in picks) / len(picks)
    assert frac == pytest.approx(0.75, abs=0.03)
    assert all(t.source == "replay" for t in picks)
    # a high temperature flattens it
    picks = r.sample(0, 4000, reward_temperature=100.0)
    assert sum(t.tokens == [1] for t in picks) / 4000 == pytest.approx(0.5, abs=0.03)
    assert r.sample(5, 3) == []


def test_uniform_sampling_and_state_round_trip():
    r = Replay(capacity_per_prompt=10, dedup_fraction=0.0, sampling="uniform", seed=1)
    r.add([traj([i], -10.0 * i) for i in range(4)])
    picks = r.sample(0, 4000)
    assert sum(t.tokens == [3] for t in picks) / 4000 == pytest.approx(0.25, abs=0.03)
    state = r.state_dict()
    r2 = Replay(capacity_per_prompt=10, dedup_fraction=0.0, sampling="uniform")
    r2.load_state_dict(state)
    assert [t.tokens for t in r2.sample(0, 20)] == [t.tokens for t in r.sample(0, 20)]


def test_unscored_trajectory_is_refused():
    with pytest.raises(ValueError, match="score it first"):
        Replay().add([Trajectory(0, [1])])
