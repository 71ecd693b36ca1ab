"""The prioritized replay buffer."""

import math

import pytest

from gfnlm.actors.replay import Replay, edit_distance
from gfnlm.actors.trajectory import Trajectory


def traj(tokens, log_r, record_id=0):
    return Trajectory(record_id, list(tokens), log_r=[0.0] * len(tokens) + [log_r])


def test_edit_distance():
    assert edit_distance((1, 2, 3), (1, 2, 3)) == 0
    assert edit_distance((1, 2, 3), (1, 3)) == 1
    assert edit_distance((), (4, 5)) == 2
    assert edit_distance((1, 2, 3, 4), (2, 1, 3, 5)) == 3


def test_keeps_top_k_per_prompt():
    r = Replay(capacity_per_prompt=3, dedup_fraction=0.0)
    r.add([traj([i], -i) for i in range(6)] + [traj([9], -1.0, record_id=1)])
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
    picks = [t for _ in range(4000) for t in r.sample(0, 1, reward_temperature=1.0)]
    frac = sum(t.tokens == [1] for t in picks) / len(picks)
    assert frac == pytest.approx(0.75, abs=0.03)
    assert all(t.source == "replay" for t in picks)
    # a high temperature flattens it
    picks = [t for _ in range(4000) for t in r.sample(0, 1, reward_temperature=100.0)]
    assert sum(t.tokens == [1] for t in picks) / 4000 == pytest.approx(0.5, abs=0.03)
    assert r.sample(5, 3) == []


def test_uniform_sampling_and_state_round_trip():
    r = Replay(capacity_per_prompt=10, dedup_fraction=0.0, sampling="uniform", seed=1)
    r.add([traj([i], -10.0 * i) for i in range(4)])
    picks = [t for _ in range(4000) for t in r.sample(0, 1)]
    assert sum(t.tokens == [3] for t in picks) / 4000 == pytest.approx(0.25, abs=0.03)
    state = r.state_dict()
    r2 = Replay(capacity_per_prompt=10, dedup_fraction=0.0, sampling="uniform")
    r2.load_state_dict(state)
    assert [t.tokens for t in r2.sample(0, 3)] == [t.tokens for t in r.sample(0, 3)]


@pytest.mark.parametrize("sampling", ["uniform", "softmax"])
def test_a_short_buffer_gives_each_trajectory_once(sampling):
    r = Replay(capacity_per_prompt=10, dedup_fraction=0.0, sampling=sampling, seed=1)
    r.add([traj([i], -1.0 * i) for i in range(3)])
    for n in (3, 8):
        assert sorted(t.tokens for t in r.sample(0, n)) == [[0], [1], [2]]
    assert len(r.sample(0, 2)) == 2
    assert r.sizes([0, 7]) == [3, 0]
    assert [t.tokens for t in r.sample_many([(0, 5), (7, 4)])] and len(r.sample_many([(0, 5), (7, 4)])) == 3


def test_bounded_edit_distance_is_exact_below_its_limit():
    import random

    from gfnlm.actors.replay import edit_distance

    def plain(a, b):
        prev = list(range(len(b) + 1))
        for i, x in enumerate(a, 1):
            cur = [i]
            for j, y in enumerate(b, 1):
                cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y)))
            prev = cur
        return prev[-1]

    rng = random.Random(0)
    for _ in range(2000):
        a = tuple(rng.randrange(4) for _ in range(rng.randrange(12)))
        b = tuple(rng.randrange(4) for _ in range(rng.randrange(12)))
        d = plain(a, b)
        assert edit_distance(a, b) == d
        for limit in range(1, 10):
            got = edit_distance(a, b, limit)
            assert got == d if d < limit else got >= limit


def test_unscored_trajectory_is_refused():
    with pytest.raises(ValueError, match="score it first"):
        Replay().add([Trajectory(0, [1])])


def test_near_duplicate_check_with_the_multiset_bound_is_exact():
    import random

    from gfnlm.actors.replay import edit_distance

    rng = random.Random(3)
    r = Replay(capacity_per_prompt=10, dedup_fraction=0.25)
    for _ in range(3000):
        a = [rng.randrange(5) for _ in range(rng.randrange(1, 14))]
        b = list(a)
        for _ in range(rng.randrange(5)):  # a few random edits: near and far pairs alike
            k = rng.randrange(len(b) + 1)
            op = rng.randrange(3)
            if op == 0:
                b.insert(k, rng.randrange(5))
            elif b and op == 1:
                b.pop(min(k, len(b) - 1))
            elif b:
                b[min(k, len(b) - 1)] = rng.randrange(5)
        ta, tb = Trajectory(0, a), Trajectory(0, b)
        limit = 0.25 * (len(a) + len(b))
        exact = a == b or (limit > 0 and edit_distance(tuple(a), tuple(b)) < limit)
        assert r._near(ta, tb) == exact, (a, b)


def test_rescored_copies_are_written_back_and_reorder_the_buffer():
    """A reward that learns (the M-step's) rescored two drawn copies: the buffer takes their new log R
    and version, so its order, eviction and dedup compare rewards of one version."""
    r = Replay(capacity_per_prompt=3, dedup_fraction=0.0)
    ts = [Trajectory(0, [i], log_r=[0.0, -float(i)]) for i in range(3)]
    r.add(ts)
    assert [u.tokens for u in r.buffers[0]] == [[0], [1], [2]]
    drawn = r.sample(0, 3)
    for u in drawn:
        if u.tokens == [2]:
            u.log_r, u.reward_version = [0.0, 5.0], 1
        if u.tokens == [0]:
            u.log_r, u.reward_version = [0.0, -9.0], 1
    assert r.refresh(drawn) == 2
    assert [u.tokens for u in r.buffers[0]] == [[2], [1], [0]]
    assert [u.reward_version for u in r.buffers[0]] == [1, 0, 1] and r.buffers[0][0].final_log_r == 5.0
    # a new trajectory now competes with the new values: it beats [0] (-9) for the last place
    assert r.add([Trajectory(0, [7], log_r=[0.0, -4.0])]) == 1
    assert [u.tokens for u in r.buffers[0]] == [[2], [1], [7]]
