"""The loss is pure math: hand-computed cases, a brute-force reference, and its properties."""

import math
import subprocess
import sys

import pytest
import torch
from torch.testing import assert_close

from gfnlm.learner.objectives import subtb_loss, tb_loss, vargrad_loss


def brute_subtb(log_pf, log_pterm, log_r, lengths, lam=1.0, tool_mask=None):
    """Double loop in float64, straight from the definition."""
    num = torch.zeros((), dtype=torch.float64)
    den = 0.0
    for b in range(log_pf.shape[0]):
        n = int(lengths[b])
        tool = [bool(tool_mask[b, k]) if tool_mask is not None else False for k in range(n)]
        terminable = [not (k < n and tool[k]) for k in range(n + 1)]
        for i in range(n + 1):
            for j in range(i + 1, n + 1):
                if not (terminable[i] and terminable[j]):
                    continue
                f_i = log_r[b, i].double() - log_pterm[b, i].double()
                f_j = log_r[b, j].double() - log_pterm[b, j].double()
                path = sum((log_pf[b, k].double() for k in range(i, j) if not tool[k]), torch.zeros((), dtype=torch.float64))
                w = lam ** (j - i - 1)
                num = num + w * (f_i - f_j + path) ** 2
                den += w
    return num / den if den else num * 0


def random_batch(B=5, T=6, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    log_pf = -torch.rand(B, T, generator=g, dtype=dtype) * 3
    log_pterm = -torch.rand(B, T + 1, generator=g, dtype=dtype) * 3
    log_r = torch.randn(B, T + 1, generator=g, dtype=dtype) * 4
    lengths = torch.randint(0, T + 1, (B,), generator=g)
    lengths[0] = T  # one full-length trajectory
    return log_pf, log_pterm, log_r, lengths


def test_hand_computed_case():
    # One trajectory of n = 2 tokens, λ = 1.
    #   log_pf    = [-1, -2]          log_pterm = [-3, -1, 0]      log_r = [-10, -4, -2]
    #   F_k = log_r - log_pterm       = [-7, -3, -2]
    #   pair (0,1): F0 - F1 + pf0        = -7 + 3 - 1      = -5  -> 25
    #   pair (1,2): F1 - F2 + pf1        = -3 + 2 - 2      = -3  ->  9
    #   pair (0,2): F0 - F2 + pf0 + pf1  = -7 + 2 - 3      = -8  -> 64
    #   loss = (25 + 9 + 64) / 3 = 98 / 3
    log_pf = torch.tensor([[-1.0, -2.0]])
    log_pterm = torch.tensor([[-3.0, -1.0, 0.0]])
    log_r = torch.tensor([[-10.0, -4.0, -2.0]])
    loss = subtb_loss(log_pf, log_pterm, log_r, torch.tensor([2]))
    assert_close(loss, torch.tensor(98 / 3))
    # With λ = 0.5 the long pair weighs 0.5: (25 + 9 + 0.5 * 64) / 2.5 = 66 / 2.5
    loss = subtb_loss(log_pf, log_pterm, log_r, torch.tensor([2]), lam=0.5)
    assert_close(loss, torch.tensor(66 / 2.5))


@pytest.mark.parametrize("lam", [1.0, 0.9, 0.3])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_brute_force(lam, seed):
    batch = random_batch(seed=seed, dtype=torch.float64)
    assert_close(subtb_loss(*batch, lam=lam), brute_subtb(*batch, lam=lam))


def test_matches_brute_force_with_tool_mask():
    log_pf, log_pterm, log_r, lengths = random_batch(B=4, T=7, seed=3, dtype=torch.float64)
    lengths[:] = torch.tensor([7, 5, 3, 0])
    tool = torch.zeros(4, 7, dtype=torch.bool)
    tool[0, 2:4] = True  # two inserted tokens in the middle
    tool[1, 4] = True    # the last token inserted
    tool[2, 0] = True    # the first token inserted
    assert_close(subtb_loss(log_pf, log_pterm, log_r, lengths, tool_mask=tool),
                 brute_subtb(log_pf, log_pterm, log_r, lengths, tool_mask=tool))
    # a tool token's log_pf and the termination of the state before it do not matter
    log_pf2, log_pterm2 = log_pf.clone(), log_pterm.clone()
    log_pf2[0, 2:4] = 123.0
    log_pterm2[0, 2:4] = -77.0
    assert_close(subtb_loss(log_pf2, log_pterm2, log_r, lengths, tool_mask=tool),
                 subtb_loss(log_pf, log_pterm, log_r, lengths, tool_mask=tool))


def test_zero_when_balanced():
    # Build a policy that satisfies every pair's balance: pick arbitrary flows F_k and set
    # log_pf[k] = F_{k+1} - F_k, so F_i - F_j + sum pf = 0 for every i < j; TB then needs
    # log Z = F_0.
    B, T = 3, 5
    g = torch.Generator().manual_seed(7)
    flows = torch.randn(B, T + 1, generator=g)
    log_pterm = -torch.rand(B, T + 1, generator=g)
    log_r = flows + log_pterm
    log_pf = flows[:, 1:] - flows[:, :-1]
    loss = subtb_loss(log_pf, log_pterm, log_r, torch.tensor([5, 3, 1]))
    assert loss.item() == pytest.approx(0.0, abs=1e-10)
    assert tb_loss(log_pf, log_pterm, log_r, torch.tensor([5, 3, 1]), log_z=flows[:, 0]).item() == pytest.approx(0, abs=1e-10)


def test_padding_never_changes_value_or_gradients():
    log_pf, log_pterm, log_r, lengths = random_batch(B=4, T=5, seed=4)
    lengths[:] = torch.tensor([5, 2, 0, 3])

    def run(pf, pt, r):
        pf, pt = pf.clone().requires_grad_(), pt.clone().requires_grad_()
        loss = subtb_loss(pf, pt, r, lengths)
        loss.backward()
        return loss, pf.grad, pt.grad

    ref = run(log_pf, log_pterm, log_r)
    # Garbage (including inf) past each end, and extra padding columns.
    pad = 3
    pf = torch.cat([log_pf, torch.full((4, pad), float("nan"))], 1)
    pt = torch.cat([log_pterm, torch.full((4, pad), -float("inf"))], 1)
    r = torch.cat([log_r, torch.full((4, pad), float("inf"))], 1)
    for b, n in enumerate(lengths.tolist()):
        pf[b, n:] = float("inf")
        pt[b, n + 1 :] = -float("inf")
        r[b, n + 1 :] = float("nan")
    out = run(pf, pt, r)
    assert_close(out[0], ref[0])
    for b, n in enumerate(lengths.tolist()):
        assert_close(out[1][b, :n], ref[1][b, :n])
        assert_close(out[2][b, : n + 1], ref[2][b, : n + 1])
        assert torch.all(out[1][b, n:] == 0) and torch.all(out[2][b, n + 1 :] == 0)


def test_no_pairs_gives_zero_not_nan():
    log_pf, log_pterm, log_r, _ = random_batch(B=3, T=4)
    pt = log_pterm.clone().requires_grad_()
    loss = subtb_loss(log_pf, pt, log_r, torch.zeros(3, dtype=torch.long))
    loss.backward()
    assert loss.item() == 0.0 and torch.all(pt.grad == 0)


def test_lambda_zero_is_detailed_balance():
    log_pf, log_pterm, log_r, lengths = random_batch(B=4, T=6, seed=5, dtype=torch.float64)
    F = log_r - log_pterm
    terms = []
    for b, n in enumerate(lengths.tolist()):
        for k in range(n):
            terms.append((F[b, k] + log_pf[b, k] - F[b, k + 1]) ** 2)
    expected = torch.stack(terms).sum() / len(terms)
    assert_close(subtb_loss(log_pf, log_pterm, log_r, lengths, lam=0.0), expected)
    assert_close(subtb_loss(log_pf, log_pterm, log_r, lengths, lam=1e-9), expected, rtol=1e-6, atol=1e-6)


def test_tb_loss_uses_only_the_final_state():
    log_pf, log_pterm, log_r, lengths = random_batch(B=3, T=4, seed=6, dtype=torch.float64)
    lengths[:] = torch.tensor([4, 2, 0])
    log_z = torch.tensor(1.5, dtype=torch.float64)
    expected = torch.stack([
        (log_z + log_pf[b, :n].sum() + log_pterm[b, n] - log_r[b, n]) ** 2
        for b, n in enumerate(lengths.tolist())
    ]).mean()
    assert_close(tb_loss(log_pf, log_pterm, log_r, lengths, log_z), expected)


def test_importable_without_ray_vllm_transformers():
    code = (
        "import sys\n"
        "for m in ('ray', 'vllm', 'transformers', 'peft'): sys.modules[m] = None\n"
        "import gfnlm.learner.objectives as o\n"
        "import torch\n"
        "print(o.subtb_loss(torch.zeros(1, 1), torch.zeros(1, 2), torch.zeros(1, 2), torch.tensor([1])).item())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "0.0"


def test_known_state_flows_replace_the_reward_derived_ones():
    # one trajectory of 2 tokens; the task knows F(s_1) / F(s_0) = 0.5, nothing of s_2
    log_pf = torch.tensor([[-0.7, -0.1]], requires_grad=True)
    log_pterm = torch.tensor([[-3.0, -2.0, -0.2]], requires_grad=True)
    log_r = torch.tensor([[-50.0, -50.0, -1.0]])
    flow = torch.tensor([[float("nan"), -0.6931, float("nan")]])
    F0 = -50.0 - -3.0
    F1, F2 = F0 - 0.6931, -1.0 - -0.2
    want = ((F0 - F1 - 0.7) ** 2 + (F0 - F2 - 0.8) ** 2 + (F1 - F2 - 0.1) ** 2) / 3
    loss = subtb_loss(log_pf, log_pterm, log_r, torch.tensor([2]), log_flow=flow)
    assert loss.item() == pytest.approx(want, rel=1e-5)
    loss.backward()
    # the known state's termination gets no gradient (its floor reward says nothing); s_0's and s_2's do
    assert log_pterm.grad[0, 1] == 0 and log_pterm.grad[0, 0] != 0 and log_pterm.grad[0, 2] != 0
    # all-NaN flows are modified SubTB itself
    plain = subtb_loss(log_pf, log_pterm, log_r, torch.tensor([2]))
    same = subtb_loss(log_pf, log_pterm, log_r, torch.tensor([2]), log_flow=torch.full((1, 3), float("nan")))
    assert same.item() == pytest.approx(plain.item())


def _tabular_case(min_len=2, max_len=3, V=2, seed=0):
    """Every Z over V tokens with min_len <= |Z| <= max_len, a random reward, and index tensors that
    turn a tabular policy (one row of logits per prefix: V tokens, then ⊤) into the objectives' tensors."""
    import itertools

    objects = [x for n in range(min_len, max_len + 1) for x in itertools.product(range(V), repeat=n)]
    prefixes = [p for n in range(max_len + 1) for p in itertools.product(range(V), repeat=n)]
    index = {p: i for i, p in enumerate(prefixes)}
    B, T = len(objects), max_len
    pf_row = torch.zeros(B, T, dtype=torch.long)
    pf_tok = torch.zeros(B, T, dtype=torch.long)
    pt_row = torch.zeros(B, T + 1, dtype=torch.long)
    for b, x in enumerate(objects):
        for k in range(len(x)):
            pf_row[b, k], pf_tok[b, k] = index[x[:k]], x[k]
        for k in range(len(x) + 1):
            pt_row[b, k] = index[x[:k]]
    g = torch.Generator().manual_seed(seed)
    log_R = torch.randn(B, generator=g, dtype=torch.float64) * 1.5
    lengths = torch.tensor([len(x) for x in objects])
    log_r = torch.full((B, T + 1), -99.0, dtype=torch.float64)  # prefixes that cannot end: the floor (unused)
    for b, x in enumerate(objects):
        for k in range(min_len, len(x) + 1):
            log_r[b, k] = log_R[objects.index(x[:k])]
    depth = torch.tensor([len(p) for p in prefixes])
    return dict(objects=objects, prefixes=prefixes, pf_row=pf_row, pf_tok=pf_tok, pt_row=pt_row, log_R=log_R,
                lengths=lengths, log_r=log_r, depth=depth, V=V, min_len=min_len, max_len=max_len)


def _tabular_terms(case, table):
    """log_pf [B,T], log_pterm [B,T+1] of the tabular policy: ⊤ taken out before min_len (the
    renormalised q the samplers draw from), ⊤ forced at max_len."""
    V = case["V"]
    logits = table.clone()
    no_end = (case["depth"] < case["min_len"])[:, None] & (torch.arange(V + 1) == V)[None, :]
    only_end = (case["depth"] == case["max_len"])[:, None] & (torch.arange(V + 1) < V)[None, :]
    logp = torch.log_softmax(logits.masked_fill(no_end | only_end, -float("inf")), -1)
    log_pf = logp[case["pf_row"], case["pf_tok"]]
    log_pterm = logp[case["pt_row"], V]
    return log_pf, log_pterm


def _from_min_len(lengths, width, min_len):
    """[B, width] True where k >= min_len: the states that can end of a task without tools."""
    return (torch.arange(width) >= min_len)[None, :].expand(len(lengths), width)


@pytest.mark.parametrize("objective", ["subtb", "subtb_lambda", "subtb_batch_root", "tb", "vargrad"])
def test_the_optimum_over_states_that_cannot_end_is_q_proportional_to_r(objective):
    """States before min_len cannot end: ⊤ taken out of q there, no termination term, sub-trajectories
    balanced between states that can end and the first state's learned flow. Trained to convergence on
    every Z of a tiny enumerable task, the policy's q(Z ⊤) is R(Z) / Σ R (brute force) and log Z the
    log of Σ R."""
    case = _tabular_case()
    table = torch.zeros(len(case["prefixes"]), case["V"] + 1, dtype=torch.float64, requires_grad=True)
    log_z = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([table, log_z], lr=0.05)
    lengths, B = case["lengths"], len(case["objects"])
    can_end = _from_min_len(lengths, case["max_len"] + 1, case["min_len"])
    for it in range(4000):
        if it == 2000:  # settle
            for group in opt.param_groups:
                group["lr"] = 0.005
        opt.zero_grad()
        log_pf, log_pterm = _tabular_terms(case, table)
        if objective == "tb":
            loss = tb_loss(log_pf, log_pterm, case["log_r"], lengths, log_z)
        elif objective == "vargrad":  # log Z: the batch's estimate
            loss, _ = vargrad_loss(log_pf, log_pterm, case["log_r"], lengths, torch.zeros(B, dtype=torch.long))
        elif objective == "subtb_batch_root":  # the first state's flow: the batch's estimate (what SubTB uses)
            loss = subtb_loss(log_pf, log_pterm, case["log_r"], lengths, can_end=can_end,
                              root_groups=torch.zeros(B, dtype=torch.long))
        else:
            loss = subtb_loss(log_pf, log_pterm, case["log_r"], lengths, lam=0.9 if objective == "subtb_lambda" else 1.0,
                              can_end=can_end, log_root=log_z.expand(B))
        loss.backward()
        opt.step()
    with torch.no_grad():
        log_pf, log_pterm = _tabular_terms(case, table)
        inside = torch.arange(log_pf.shape[1])[None, :] < lengths[:, None]
        log_q = torch.where(inside, log_pf, torch.zeros_like(log_pf)).sum(1) + log_pterm.gather(1, lengths[:, None]).squeeze(1)
    torch.testing.assert_close(log_q.exp(), torch.softmax(case["log_R"], 0), atol=1e-4, rtol=0)
    if objective not in ("subtb_batch_root", "vargrad"):  # no log Z parameter there
        assert log_z.item() == pytest.approx(torch.logsumexp(case["log_R"], 0).item(), abs=1e-3)


def test_states_that_cannot_end_carry_no_flow_and_no_gradient_of_their_own():
    """With can_end, a state before min_len is in no pair of its own: its reward and its (−inf) log q(⊤)
    change neither the value nor the gradients; the first state takes part through log_root."""
    torch.manual_seed(3)
    B, T = 3, 4
    lengths = torch.tensor([4, 3, 2])
    log_pf = torch.randn(B, T, dtype=torch.float64, requires_grad=True)
    log_pterm = torch.randn(B, T + 1, dtype=torch.float64)
    log_pterm[:, :2] = -float("inf")  # ⊤ taken out before min_len = 2
    log_pterm.requires_grad_(True)
    log_r = torch.randn(B, T + 1, dtype=torch.float64)
    root = torch.randn(B, dtype=torch.float64, requires_grad=True)
    can_end = _from_min_len(lengths, T + 1, 2)
    loss = subtb_loss(log_pf, log_pterm, log_r, lengths, can_end=can_end, log_root=root)
    other = log_r.clone()
    other[:, 1] = 1e6  # a reward at a state that cannot end: unused
    assert torch.equal(subtb_loss(log_pf, log_pterm, other, lengths, can_end=can_end, log_root=root), loss)
    loss.backward()
    assert torch.isfinite(loss) and log_pterm.grad[:, :2].eq(0).all() and torch.isfinite(log_pf.grad).all()
    # brute force: pairs among {0 (root), 2..n}
    want, count = 0.0, 0
    for b in range(B):
        n = int(lengths[b])
        flows = {0: root[b].item(), **{k: (log_r[b, k] - log_pterm[b, k]).item() for k in range(2, n + 1)}}
        ks = sorted(flows)
        for i in ks:
            for j in ks:
                if i < j:
                    want += (flows[i] - flows[j] + log_pf[b, i:j].sum().item()) ** 2
                    count += 1
    assert loss.item() == pytest.approx(want / count, rel=1e-12)


def test_the_batch_root_is_the_weighted_mean_per_group():
    """root_groups: F_0 of each row is the λ^(j-1)-weighted mean, over the states j >= 1 of its group's
    rows that can end, of F_j - sum_{k<j} log_pf[k]; a brute-force loss with that F_0 agrees."""
    torch.manual_seed(5)
    B, T, lam = 4, 3, 0.7
    lengths = torch.tensor([3, 2, 3, 1])
    groups = torch.tensor([0, 1, 0, 1])
    log_pf = torch.randn(B, T, dtype=torch.float64)
    log_pterm = torch.randn(B, T + 1, dtype=torch.float64)
    log_r = torch.randn(B, T + 1, dtype=torch.float64)
    can_end = _from_min_len(lengths, T + 1, 1)
    loss = subtb_loss(log_pf, log_pterm, log_r, lengths, lam=lam, can_end=can_end, root_groups=groups)
    g = {(b, j): (log_r[b, j] - log_pterm[b, j] - log_pf[b, :j].sum()).item()
         for b in range(B) for j in range(1, int(lengths[b]) + 1)}
    root = {}
    for grp in (0, 1):
        pairs = [((b, j), lam ** (j - 1)) for (b, j) in g if groups[b] == grp]
        root[grp] = sum(w * g[k] for k, w in pairs) / sum(w for _, w in pairs)
    from gfnlm.learner.objectives import subtb_log_root  # what the learner reports as SubTB's log Z

    got = subtb_log_root(log_pf, log_pterm, log_r, lengths, lam=lam, can_end=can_end, root_groups=groups)
    assert got.tolist() == pytest.approx([root[int(grp)] for grp in groups], rel=1e-7)
    plain = subtb_log_root(log_pf, log_pterm, log_r, lengths)
    assert plain.tolist() == pytest.approx((log_r[:, 0] - log_pterm[:, 0]).tolist())
    num = den = 0.0
    for b in range(B):
        n = int(lengths[b])
        flows = {0: root[int(groups[b])], **{j: (log_r[b, j] - log_pterm[b, j]).item() for j in range(1, n + 1)}}
        for i in flows:
            for j in flows:
                if i < j:
                    w = lam ** (j - i - 1)
                    num += w * (flows[i] - flows[j] + log_pf[b, i:j].sum().item()) ** 2
                    den += w
    assert loss.item() == pytest.approx(num / den, rel=1e-10)


def test_a_trajectory_cut_where_it_cannot_end_takes_part_through_its_other_states():
    """Cut at max length at a state that cannot end (arithmetic's tools end steps: log q(⊤) = -inf
    there): SubTB balances its states that can end and leaves the last one out, TB leaves the row out;
    both finite with finite gradients, and equal to the losses without that state / row."""
    torch.manual_seed(7)
    B, T = 2, 4
    lengths = torch.tensor([4, 3])
    log_pf = torch.randn(B, T, dtype=torch.float64, requires_grad=True)
    log_r = torch.randn(B, T + 1, dtype=torch.float64)
    can_end = torch.tensor([[False, True, False, True, False], [False, False, True, True, False]])
    log_pterm = torch.randn(B, T + 1, dtype=torch.float64).masked_fill(~can_end, -float("inf"))
    root = torch.zeros(B, dtype=torch.float64)
    loss = subtb_loss(log_pf, log_pterm, log_r, lengths, can_end=can_end, log_root=root)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(log_pf.grad).all()
    shorter = subtb_loss(log_pf, log_pterm, log_r, torch.tensor([3, 3]), can_end=can_end, log_root=root)
    assert loss.item() == pytest.approx(shorter.item(), rel=1e-12)  # row 0's cut state s_4 adds no pair
    log_z = torch.zeros((), dtype=torch.float64)
    tb = tb_loss(log_pf, log_pterm, log_r, lengths, log_z)
    alone = tb_loss(log_pf[1:], log_pterm[1:], log_r[1:], lengths[1:], log_z)
    assert torch.isfinite(tb) and tb.item() == pytest.approx(alone.item(), rel=1e-12)


def _two_records(scale=6.0):
    """Two records, Z one of 4 tokens then ⊤ (forced): R_1 = e^scale · R_0 in shape and scale, so
    their partition functions differ by e^6 and a bit. Every (record, Z) in the batch once: an
    off-policy batch, as replayed and tempered samples make it."""
    g = torch.Generator().manual_seed(11)
    log_R = torch.randn(2, 4, generator=g, dtype=torch.float64)
    log_R[1] += scale
    rec = torch.arange(2).repeat_interleave(4)
    z = torch.arange(4).repeat(2)
    log_r = torch.zeros(8, 2, dtype=torch.float64)
    log_r[:, 1] = log_R[rec, z]
    return log_R, rec, z, log_r


def _train_two_records(log_z_of, params, table, rec, z, log_r, steps=3000):
    opt = torch.optim.Adam([table] + params, lr=0.05)
    for it in range(steps):
        if it == steps // 2:
            for group in opt.param_groups:
                group["lr"] = 0.005
        opt.zero_grad()
        log_pf = torch.log_softmax(table, -1)[rec, z][:, None]
        log_pterm = torch.zeros(8, 2, dtype=torch.float64)  # ⊤ forced after one token
        loss = tb_loss(log_pf, log_pterm, log_r, torch.ones(8, dtype=torch.long), log_z_of(rec))
        loss.backward()
        opt.step()
    q = torch.softmax(table.detach(), -1)
    return q


def test_tb_with_one_log_z_per_record_settles_at_q_proportional_to_r_where_a_shared_one_cannot():
    """The bug of issue 24: one scalar log Z for records whose partition functions differ (e^6 here)
    does not settle at q ∝ R on an off-policy batch; one log Z per record does, at log Z_r = log Σ R_r."""
    log_R, rec, z, log_r = _two_records()
    target = torch.softmax(log_R, -1)

    def kl(q):
        return float((target * (target.log() - q.log())).sum(-1).max())

    shared = torch.zeros((), dtype=torch.float64, requires_grad=True)
    q_shared = _train_two_records(lambda r: shared, [shared], torch.zeros(2, 4, dtype=torch.float64, requires_grad=True),
                                  rec, z, log_r)
    table_z = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    q_per = _train_two_records(lambda r: table_z[r], [table_z], torch.zeros(2, 4, dtype=torch.float64, requires_grad=True),
                               rec, z, log_r)
    assert kl(q_per) < 1e-6
    assert_close(table_z.detach(), torch.logsumexp(log_R, -1), atol=1e-4, rtol=0)
    assert kl(q_shared) > 0.1, "a shared log Z is off for both records"


def test_length_normalised_tb_and_vargrad_with_clipped_importance_weights_hand_computed():
    """FlowRL's form: residual log Z + (log q(Z ⊤) − log R) / actions (tokens + ⊤), each squared
    residual times min(q_θ / q_sampler, cap) without gradient, a seed (NaN behaviour) at weight 1."""
    from gfnlm.learner.objectives import importance_weights

    log_pf = torch.tensor([[-1.0, -2.0], [-0.5, 0.0], [-3.0, 0.0]], dtype=torch.float64, requires_grad=True)
    log_pterm = torch.tensor([[0.0, 0.0, -0.1], [0.0, -0.2, 0.0], [0.0, -0.3, 0.0]], dtype=torch.float64)
    log_r = torch.tensor([[0.0, 0.0, 1.0], [0.0, 2.0, 0.0], [0.0, 5.0, 0.0]], dtype=torch.float64)
    lengths = torch.tensor([2, 1, 1])
    log_q = [-3.1, -0.7, -3.3]
    acts = [3.0, 2.0, 2.0]
    behaviour = torch.tensor([-3.1 - math.log(2.0), -0.7 + math.log(4.0), float("nan")], dtype=torch.float64)
    w = importance_weights(torch.tensor(log_q, dtype=torch.float64), behaviour, cap=1.5)
    assert w.tolist() == pytest.approx([1.5, 0.25, 1.0])  # 2 capped at 1.5; 1/4; a seed
    log_z = torch.tensor(0.4, dtype=torch.float64)
    loss = tb_loss(log_pf, log_pterm, log_r, lengths, log_z, length_normalize=True, weights=w)
    r = [0.4 + (q - lr) / a for q, lr, a in zip(log_q, [1.0, 2.0, 5.0], acts)]
    assert loss.item() == pytest.approx((1.5 * r[0] ** 2 + 0.25 * r[1] ** 2 + 1.0 * r[2] ** 2) / 3)
    loss.backward()
    assert log_pf.grad[0, 0].item() == pytest.approx(2 * 1.5 * r[0] / 3 / 3)  # d resid / d log_pf = 1 / actions
    groups = torch.tensor([7, 7, 3])
    loss, est = vargrad_loss(log_pf.detach(), log_pterm, log_r, lengths, groups, length_normalize=True)
    g = [(lr - q) / a for q, lr, a in zip(log_q, [1.0, 2.0, 5.0], acts)]
    z7 = (g[0] + g[1]) / 2
    assert est.tolist() == pytest.approx([z7, z7, g[2]])
    assert loss.item() == pytest.approx(((z7 - g[0]) ** 2 + (z7 - g[1]) ** 2) / 3)


def test_vargrad_hand_computed():
    """log Z per group = mean of log R − log q over its rows (no gradient); the loss is TB's with it."""
    log_pf = torch.tensor([[-1.0, -2.0], [-0.5, 0.0], [-3.0, 0.0]], dtype=torch.float64, requires_grad=True)
    log_pterm = torch.tensor([[0.0, 0.0, -0.1], [0.0, -0.2, 0.0], [0.0, -0.3, 0.0]], dtype=torch.float64)
    log_r = torch.tensor([[0.0, 0.0, 1.0], [0.0, 2.0, 0.0], [0.0, 5.0, 0.0]], dtype=torch.float64)
    lengths = torch.tensor([2, 1, 1])
    groups = torch.tensor([7, 7, 3])
    loss, log_z = vargrad_loss(log_pf, log_pterm, log_r, lengths, groups)
    g = [1.0 - (-3.1), 2.0 - (-0.7), 5.0 - (-3.3)]  # log R − log q per row
    z7 = (g[0] + g[1]) / 2
    assert log_z.tolist() == pytest.approx([z7, z7, g[2]])
    assert loss.item() == pytest.approx(((z7 - g[0]) ** 2 + (z7 - g[1]) ** 2 + 0.0) / 3)
    loss.backward()  # the estimate carries no gradient: d/d log_pf[0,0] = 2 (z7 − g0) / 3 · (+1)
    assert log_pf.grad[0, 0].item() == pytest.approx(2 * (z7 - g[0]) / 3)


def _word_rule_case(V=2, max_len=3, seed=1, floor=-30.0):
    """Every Z over V tokens of at most max_len that may end only once it holds token 1 (as a
    constrained Z may end only once it uses the required word), and the dead ends: the Z of max_len
    without it, which the samplers cut there. A random reward on the first, the floor on the second,
    and a tabular policy's index tensors (⊤ out where a prefix may not end, forced at max_len)."""
    import itertools

    prefixes = [p for n in range(max_len + 1) for p in itertools.product(range(V), repeat=n)]
    index = {p: i for i, p in enumerate(prefixes)}
    objects = [p for p in prefixes if 1 in p]
    dead = [p for p in prefixes if len(p) == max_len and 1 not in p]
    trajs = objects + dead
    B, T = len(trajs), max_len
    pf_row, pf_tok = torch.zeros(B, T, dtype=torch.long), torch.zeros(B, T, dtype=torch.long)
    pt_row = torch.zeros(B, T + 1, dtype=torch.long)
    can_end = torch.zeros(B, T + 1, dtype=torch.bool)
    for b, x in enumerate(trajs):
        for k in range(len(x)):
            pf_row[b, k], pf_tok[b, k] = index[x[:k]], x[k]
        for k in range(len(x) + 1):
            pt_row[b, k], can_end[b, k] = index[x[:k]], 1 in x[:k]
    log_R = torch.randn(len(objects), generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 1.5
    log_r = torch.full((B, T + 1), floor, dtype=torch.float64)
    for b, x in enumerate(objects):
        for k in range(len(x) + 1):
            if can_end[b, k]:
                log_r[b, k] = log_R[objects.index(x[:k])]
    no_end = torch.tensor([1 not in p for p in prefixes])
    depth = torch.tensor([len(p) for p in prefixes])
    return dict(n_objects=len(objects), pf_row=pf_row, pf_tok=pf_tok, pt_row=pt_row, log_R=log_R, log_r=log_r,
                lengths=torch.tensor([len(x) for x in trajs]), can_end=can_end, no_end=no_end, depth=depth, V=V,
                max_len=max_len, prefixes=prefixes, terminated=torch.arange(B) < len(objects))


@pytest.mark.parametrize("objective", ["subtb", "subtb_batch_root", "tb"])
def test_the_optimum_under_a_word_rule_with_dead_ends_is_q_proportional_to_r(objective):
    """A Z may end only once it holds a given token (constrained generation's rule on the required
    word): ⊤ out of q elsewhere, and the Z cut at max length without it (dead ends) end there by force
    at the floor (`forced_cap_ends`). Trained to convergence on every Z, q(Z ⊤) over the Z that may
    end is R(Z) / Σ R (brute force), and the dead ends keep no mass. Without the forced ends a dead
    end carries no term, and the mass they take would cost nothing (each case fails then). (The
    tabular policy's ⊤ is forced at max length where Z may end, a capped task; the learner's is
    q(⊤) there.)"""
    from gfnlm.learner.objectives import forced_cap_ends

    case = _word_rule_case()
    V, lengths, B = case["V"], case["lengths"], len(case["lengths"])
    table = torch.zeros(len(case["prefixes"]), V + 1, dtype=torch.float64, requires_grad=True)
    log_z = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([table, log_z], lr=0.05)
    end_col = torch.arange(V + 1) == V
    at_cap = case["depth"] == case["max_len"]

    # the cap as the sampler has it: a Z that may end there ends there; a dead end is cut, ⊤ masked
    # there as everywhere it may not end (log q(⊤) = -inf, the learner's value) until forced_cap_ends
    dead_last = torch.zeros(B, case["max_len"] + 1, dtype=torch.bool)
    dead_last[~case["terminated"], case["max_len"]] = True

    def terms():
        mask = (case["no_end"] & ~at_cap)[:, None] & end_col[None, :] | at_cap[:, None] & ~end_col[None, :]
        logp = torch.log_softmax(table.masked_fill(mask, -float("inf")), -1)
        log_pterm = logp[case["pt_row"], V].masked_fill(dead_last, -float("inf"))
        log_pterm, can_end = forced_cap_ends(log_pterm, case["can_end"], lengths, case["terminated"])
        return logp[case["pf_row"], case["pf_tok"]], log_pterm, can_end

    for it in range(4000):
        if it == 2000:
            for group in opt.param_groups:
                group["lr"] = 0.005
        opt.zero_grad()
        log_pf, log_pterm, can_end = terms()
        if objective == "tb":
            loss = tb_loss(log_pf, log_pterm, case["log_r"], lengths, log_z)
        elif objective == "subtb_batch_root":
            loss = subtb_loss(log_pf, log_pterm, case["log_r"], lengths, can_end=can_end,
                              root_groups=torch.zeros(B, dtype=torch.long))
        else:
            loss = subtb_loss(log_pf, log_pterm, case["log_r"], lengths, can_end=can_end, log_root=log_z.expand(B))
        loss.backward()
        opt.step()
    with torch.no_grad():
        log_pf, log_pterm, _ = terms()
        inside = torch.arange(log_pf.shape[1])[None, :] < lengths[:, None]
        log_q = torch.where(inside, log_pf, torch.zeros_like(log_pf)).sum(1) + log_pterm.gather(1, lengths[:, None]).squeeze(1)
    n = case["n_objects"]
    torch.testing.assert_close(log_q[:n].exp(), torch.softmax(case["log_R"], 0), atol=1e-4, rtol=0)
    assert log_q[n:].exp().sum() < 1e-4, "the dead ends keep mass"
