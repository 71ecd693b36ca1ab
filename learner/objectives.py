"""GFlowNet objectives for autoregressive generation. Pure torch: no ray, vllm or transformers.

Notation (batch of B trajectories padded to T sampled tokens):
  s_k            the state after k generated tokens (s_0 = the prompt alone)
  log_pf[b, k]   log q(z_{k+1} | s_k),          k < n_b        shape [B, T]
  log_pterm[b,k] log q(⊤ | s_k),                k <= n_b       shape [B, T+1]
  log_r[b, k]    log R(s_k ⊤) (already tempered), k <= n_b     shape [B, T+1]
  lengths[b]     n_b, the number of non-terminating tokens     shape [B]
  tool_mask[b,k] True where z_{k+1} was inserted by a tool: an environment step with no
                 log q, and the state before it has no termination option.
  can_end[b,k]   False where the task says s_k cannot end (k < min_len; arithmetic may say more):
                 the samplers never end there, q(⊤ | s_k) is taken out of the policy there
                 (log_pf is the renormalised q, `actors.policy.mask_end`), and the state carries no
                 flow of its own. None: every state can end. The final state of a trajectory the
                 policy ended always can; one cut at max length where it cannot end (a dead end:
                 the required word never came) is given its terminal by `forced_cap_ends`: the
                 samplers stopped it there, so ⊤ is forced (log q = 0) with the reward the task gives
                 that state (the floor), and the loss pushes such dead ends down.

A state that can terminate has log F(s_k) = log R(s_k ⊤) - log q(⊤ | s_k): no flow network
(Hu et al. 2024, eq. 6); sub-trajectories are balanced between such states only, so the optimum is
still q(Z ⊤) ∝ R(Z) over the Z that can end. Where a task knows a state's flow relative to the first state's (log_flow, e.g. from the sums of a
finite target over the members extending each prefix) F_k = F_0 + log_flow[k] is used instead: a
prefix whose own termination is worth nothing would otherwise tie F(s) to q(⊤ | s) ≈ e^floor. The modified sub-trajectory balance residual of a pair i < j is
    F_i - F_j + sum_{k=i}^{j-1} log_pf[k]
and with g_k = F_k - sum_{m<k} log_pf[m] it is simply g_i - g_j: one cumulative sum gives every
pair at once, O(T^2) per trajectory, no loop.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def forced_cap_ends(log_pterm: torch.Tensor, can_end: torch.Tensor, lengths: torch.Tensor, terminated: torch.Tensor):
    """(log_pterm, can_end) where every trajectory cut at max length whose last state cannot end
    (not `terminated`, can_end False at its length) ends there by force: log q(⊤ | s_n) = 0 and s_n
    can end, with whatever log R the task gave it (the floor). Without this a dead end would carry no
    term at all, and a policy that leaks mass to Z that never may end would cost the loss nothing."""
    idx = lengths.to(can_end.device)[:, None]
    dead = ~terminated.to(device=can_end.device, dtype=torch.bool) & ~can_end.gather(1, idx).squeeze(1)
    if not bool(dead.any()):
        return log_pterm, can_end
    at = torch.zeros_like(can_end).scatter(1, idx, dead[:, None])
    return log_pterm.masked_fill(at.to(log_pterm.device), 0.0), can_end | at


def _masks(log_pf: torch.Tensor, lengths: torch.Tensor, tool_mask: torch.Tensor | None,
           can_end: torch.Tensor | None = None):
    """(policy_token [B,T], terminable_state [B,T+1]) for trajectories of the given lengths."""
    T = log_pf.shape[1]
    steps = torch.arange(T + 1, device=log_pf.device)
    lengths = lengths.to(log_pf.device)
    state = steps[None, :] <= lengths[:, None]
    token = steps[None, :T] < lengths[:, None]
    if tool_mask is not None:
        tool = tool_mask.to(torch.bool) & token
        token = token & ~tool
        state = state & ~F.pad(tool, (0, 1), value=False)
    if can_end is not None:
        state = state & can_end.to(device=log_pf.device, dtype=torch.bool)
    return token, state


def subtb_loss(
    log_pf: torch.Tensor,
    log_pterm: torch.Tensor,
    log_r: torch.Tensor,
    lengths: torch.Tensor,
    lam: float = 1.0,
    tool_mask: torch.Tensor | None = None,
    log_flow: torch.Tensor | None = None,
    can_end: torch.Tensor | None = None,
    log_root: torch.Tensor | None = None,
    root_groups: torch.Tensor | None = None,
) -> torch.Tensor:
    """Modified sub-trajectory balance, summed over the batch:

        sum_b sum_{i<j<=n_b} lam^(j-i-1) (F_i - F_j + sum_{k=i}^{j-1} log_pf[b,k])^2
        / sum_b sum_{i<j<=n_b} lam^(j-i-1)

    with F_k = log_r[b,k] - log_pterm[b,k] at states that can end, F_0 = log_root[b] where given (a
    learned log F of the first state, which then takes part whether or not it can end: it must, when
    s_0 cannot end, or the first tokens would be in no pair) or, with `root_groups` (the record of
    each row), the batch's estimate of it: per group, the λ^(j-1)-weighted mean over its states j
    that can end of F_j - sum_{k<j} log_pf[k], without gradient (the F_0 that minimises the pairs
    (0, j): their part of the loss is then the weighted variance of those values, VarGrad's
    estimate of log Z); and F_k = F_0 + log_flow[b,k] where
    that is given and finite (a state's flow known to the task relative to the first state's:
    log F(s_k) - log F(s_0); such a state takes part whether or not it can end). Pairs past a
    trajectory's end, and states before a tool insertion or that cannot end (`can_end` False) with
    no flow of their own, are left out; padded and left-out entries may hold anything (even inf)
    without changing the value or its gradients. A batch with no pair gives 0.
    """
    state, flow, cum = _state_flows(log_pf, log_pterm, log_r, lengths, tool_mask, can_end)
    _, reachable = _masks(log_pf, lengths, tool_mask)
    if log_root is None and root_groups is not None:
        log_root, has = _batch_root(flow - cum, state, root_groups, lam)
    else:
        has = torch.ones(state.shape[0], dtype=torch.bool, device=state.device)
    if log_root is not None:
        first = torch.zeros_like(state)
        first[:, 0] = has
        flow = torch.where(first, log_root.to(flow.dtype)[:, None].expand_as(flow), flow)
        state = state | first
    if log_flow is not None:
        known = torch.isfinite(log_flow) & reachable
        rel = torch.where(known, log_flow, torch.zeros_like(log_flow))
        flow = torch.where(known, flow[:, :1] + rel, flow)
        state = state | known
    g = torch.where(state, flow - cum, torch.zeros_like(cum))
    resid = g[:, :, None] - g[:, None, :]  # [B, i, j]

    steps = torch.arange(g.shape[1], device=g.device)
    gap = steps[None, :] - steps[:, None] - 1  # j - i - 1
    upper = gap >= 0
    weight = torch.full(gap.shape, float(lam), dtype=g.dtype, device=g.device).pow(gap.clamp(min=0))
    weight = torch.where(upper, weight, torch.zeros_like(weight))
    pairs = state[:, :, None] & state[:, None, :]
    weight = torch.where(pairs, weight[None], torch.zeros_like(resid))

    num = (weight * resid.square()).sum()
    den = weight.sum()
    return num / den.clamp_min(torch.finfo(g.dtype).tiny)


def _state_flows(log_pf, log_pterm, log_r, lengths, tool_mask, can_end):
    """(states with a flow of their own [B,T+1], log F there (0 elsewhere), cum[b,k] = sum_{m<k} log_pf[b,m])."""
    token, state = _masks(log_pf, lengths, tool_mask, can_end)
    pf = torch.where(token, log_pf, torch.zeros_like(log_pf))
    cum = F.pad(pf.cumsum(dim=1), (1, 0))
    flow = torch.where(state, log_r - log_pterm, torch.zeros_like(log_r))  # -inf log_pterm where ⊤ is out
    return state, flow, cum


def subtb_log_root(log_pf, log_pterm, log_r, lengths, lam: float = 1.0, tool_mask=None, can_end=None,
                   root_groups=None) -> torch.Tensor:
    """log F(s_0) per row as `subtb_loss` uses it, without gradient: SubTB's log Z. With `root_groups`
    the batch's estimate per record (NaN for a record with no state that can end), else
    log_r[b,0] - log_pterm[b,0] (NaN where s_0 cannot end)."""
    with torch.no_grad():
        if root_groups is None:
            root = log_r[:, 0] - log_pterm[:, 0]
            return torch.where(torch.isfinite(root), root, torch.full_like(root, float("nan")))
        state, flow, cum = _state_flows(log_pf, log_pterm, log_r, lengths, tool_mask, can_end)
        root, has = _batch_root(flow - cum, state, root_groups, lam)
        return torch.where(has, root, torch.full_like(root, float("nan")))


def _batch_root(g: torch.Tensor, state: torch.Tensor, groups: torch.Tensor, lam: float):
    """(log F(s_0) per row, whether its group has a state to estimate it from): the λ^(j-1)-weighted
    mean of g[b, j] = F_j - sum_{k<j} log_pf[k] over the group's states j >= 1 that can end, detached."""
    steps = torch.arange(g.shape[1], device=g.device)
    use = state & (steps >= 1)[None, :]
    w = torch.where(use, (float(lam) ** (steps - 1).clamp(min=0)).to(g.dtype)[None, :], torch.zeros_like(g))
    vals = torch.where(use, g, torch.zeros_like(g)).detach()
    _, idx = torch.unique(groups.to(g.device), return_inverse=True)
    n = int(idx.max()) + 1 if idx.numel() else 0
    num = torch.zeros(n, dtype=g.dtype, device=g.device).index_add(0, idx, (w * vals).sum(1))
    den = torch.zeros(n, dtype=g.dtype, device=g.device).index_add(0, idx, w.sum(1))
    has = den[idx] > 0
    return torch.where(has, num[idx] / den[idx].clamp_min(torch.finfo(g.dtype).tiny), torch.zeros_like(num[idx])), has


def tb_parts(log_pf: torch.Tensor, log_pterm: torch.Tensor, log_r: torch.Tensor, lengths: torch.Tensor,
             tool_mask: torch.Tensor | None = None):
    """Per row: (log q(Z ⊤), log R(Z), whether the final state can end, the policy's actions: tokens
    it chose plus ⊤). A final state that cannot end (cut at max length there) has log q(⊤) = -inf."""
    token, _ = _masks(log_pf, lengths, tool_mask)
    idx = lengths.to(log_pf.device).long()[:, None]
    end = log_pterm.gather(1, idx).squeeze(1)
    ends = torch.isfinite(end)
    log_q = torch.where(token, log_pf, torch.zeros_like(log_pf)).sum(dim=1) + torch.where(ends, end, torch.zeros_like(end))
    actions = token.sum(dim=1).to(log_pf.dtype) + 1.0
    return log_q, log_r.gather(1, idx).squeeze(1), ends, actions


def tb_residuals(log_q, log_r, actions, length_normalize: bool = False):
    """log q(Z ⊤) - log R(Z) per row, divided by the actions with `length_normalize` (FlowRL's
    residual: log-probs and log-reward averaged over the sequence, log Z then per action)."""
    d = log_q - log_r
    return d / actions if length_normalize else d


def importance_weights(log_q: torch.Tensor, log_q_behaviour: torch.Tensor, cap: float) -> torch.Tensor:
    """FlowRL's clipped importance weights, without gradient: min(q_θ(Z) / q_behaviour(Z), cap) per
    row; NaN behaviour (a seed, drawn by no sampler) gets weight 1."""
    w = torch.exp((log_q - log_q_behaviour).detach()).clamp(max=cap)
    return torch.where(torch.isnan(log_q_behaviour), torch.ones_like(w), w)


def tb_loss(
    log_pf: torch.Tensor,
    log_pterm: torch.Tensor,
    log_r: torch.Tensor,
    lengths: torch.Tensor,
    log_z: torch.Tensor,
    tool_mask: torch.Tensor | None = None,
    length_normalize: bool = False,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Trajectory balance with a learned log Z, for rewards known only at the end:
    mean_b w_b (log Z + sum_k log_pf[b,k] + log_pterm[b,n_b] - log_r[b,n_b])^2, w_b = 1 unless
    `weights` (FlowRL's clipped importance weights). With `length_normalize` the log-probs and the
    log-reward are divided by the row's actions (tokens the policy chose + ⊤) as FlowRL does: for
    Z of one length that is TB rescaled; across lengths its optimum is no longer q ∝ R.
    Same tensors as `subtb_loss`; only the final state's reward and termination are used. A
    trajectory whose final state cannot end (cut at max length there: log q(⊤) = -inf, R = 0) has no
    balance to satisfy and is left out of the mean."""
    log_q, final_r, ends, actions = tb_parts(log_pf, log_pterm, log_r, lengths, tool_mask)
    resid = log_z + tb_residuals(torch.where(ends, log_q, torch.zeros_like(log_q)), final_r, actions, length_normalize)
    resid = torch.where(ends, resid, torch.zeros_like(resid))
    w = torch.ones_like(resid) if weights is None else weights.to(resid.dtype)
    return (w * resid.square()).sum() / ends.sum().clamp_min(1)


def vargrad_loss(
    log_pf: torch.Tensor,
    log_pterm: torch.Tensor,
    log_r: torch.Tensor,
    lengths: torch.Tensor,
    groups: torch.Tensor,
    tool_mask: torch.Tensor | None = None,
    length_normalize: bool = False,
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Trajectory balance with log Z estimated per group (the samples of one record) from the batch:
    log Z_g = mean over the group's rows of log_r[b,n_b] - log q(Z_b ⊤) (each divided by the row's
    actions with `length_normalize`), without gradient (VarGrad; Richter et al. 2020, TBA), then
    `tb_loss` with that log Z per row. Rows whose final state cannot end take no part, neither in the
    estimate nor in the loss. Returns (loss, log Z per row; NaN for a row whose group has no row that
    can end)."""
    log_q, final_r, ends, actions = tb_parts(log_pf, log_pterm, log_r, lengths, tool_mask)
    g = torch.where(ends, -tb_residuals(log_q, final_r, actions, length_normalize), torch.zeros_like(log_q)).detach()
    _, inv = torch.unique(groups.to(log_pf.device), return_inverse=True)
    n = int(inv.max()) + 1 if inv.numel() else 0
    num = torch.zeros(n, dtype=g.dtype, device=g.device).index_add(0, inv, g)
    den = torch.zeros(n, dtype=g.dtype, device=g.device).index_add(0, inv, ends.to(g.dtype))
    log_z = torch.where(den[inv] > 0, num[inv] / den[inv].clamp_min(1), torch.full_like(g, float("nan")))
    loss = tb_loss(log_pf, log_pterm, log_r, lengths, torch.nan_to_num(log_z), tool_mask, length_normalize, weights)
    return loss, log_z


def sft_loss(
    log_pf: torch.Tensor,
    log_pterm: torch.Tensor,
    lengths: torch.Tensor,
    tool_mask: torch.Tensor | None = None,
    terminated: torch.Tensor | None = None,
) -> torch.Tensor:
    """Maximum likelihood of given (reference) trajectories: the mean negative log-likelihood per
    policy action, counting every token of Z the policy chose and its final ⊤ (where `terminated`,
    default all). Tool tokens are not the policy's and are left out."""
    token, _ = _masks(log_pf, lengths, tool_mask)
    idx = lengths.to(log_pf.device).long()[:, None]
    ends = torch.ones_like(lengths, dtype=torch.bool) if terminated is None else terminated.to(torch.bool)
    ends = ends.to(log_pf.device)
    nll = -torch.where(token, log_pf, torch.zeros_like(log_pf)).sum()
    nll = nll - torch.where(ends, log_pterm.gather(1, idx).squeeze(1), torch.zeros_like(ends, dtype=log_pf.dtype)).sum()
    count = token.sum() + ends.sum()
    return nll / count.clamp_min(1)


def group_advantages(rewards: torch.Tensor, groups: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """Leave-one-out (RLOO) advantages: each reward minus the mean of the other rewards of its
    group (the samples of one record), divided by the group's standard deviation when `normalize`
    (GRPO). A sample alone in its group gets 0. Shapes [B] -> [B]."""
    same = groups[:, None] == groups[None, :]
    n = same.sum(1).to(rewards.dtype)
    total = (same * rewards[None, :]).sum(1)
    others = (n - 1).clamp_min(1)
    adv = torch.where(n > 1, rewards - (total - rewards) / others, torch.zeros_like(rewards))
    if normalize:
        mean = total / n
        var = (same * (rewards[None, :] - mean[:, None]).square()).sum(1) / n
        adv = adv / (var.sqrt() + 1e-6)
        adv = torch.where(n > 1, adv, torch.zeros_like(adv))
    return adv


def ppo_loss(
    log_p: torch.Tensor,
    old_log_p: torch.Tensor,
    ref_log_p: torch.Tensor,
    actions: torch.Tensor,
    advantages: torch.Tensor,
    clip: float = 0.2,
    kl_coef: float = 0.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped policy-gradient loss with a KL penalty to a reference policy, per action.

    log_p, old_log_p, ref_log_p [B, A]: log-probs of each trajectory's actions (its tokens, then ⊤)
    under the current, the behaviour and the reference policy; actions [B, A] marks the real ones;
    advantages [B] is broadcast over a trajectory's actions. The loss is the mean over actions of
        -min(ρ A, clip(ρ, 1-ε, 1+ε) A) + β (exp(ref - log_p) - (ref - log_p) - 1)
    with ρ = exp(log_p - old_log_p) (the second term is the non-negative k3 estimator of
    KL(π || π_ref)). Returns the loss and (clip fraction, KL estimate)."""
    mask = actions.to(torch.bool)
    count = mask.sum().clamp_min(1)
    zero = torch.zeros_like(log_p)
    ratio = torch.exp(torch.where(mask, log_p - old_log_p, zero))
    adv = advantages[:, None].expand_as(log_p)
    surrogate = torch.minimum(ratio * adv, ratio.clamp(1 - clip, 1 + clip) * adv)
    delta = torch.where(mask, ref_log_p - log_p, zero)
    kl = torch.exp(delta) - delta - 1
    loss = (torch.where(mask, -surrogate + kl_coef * kl, zero)).sum() / count
    clipped = ((ratio - 1).abs() > clip) & mask
    kl_mean = torch.where(mask, kl, zero).detach().sum() / count
    return loss, {"clip_fraction": float(clipped.sum() / count), "kl": float(kl_mean)}


def action_logprobs(log_pf: torch.Tensor, log_pterm: torch.Tensor, lengths: torch.Tensor,
                    tool_mask: torch.Tensor | None, terminated: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The policy's actions of each trajectory as one row: log_pf of its tokens, then log q(⊤) of its
    end where it terminated. Returns (log-probs [B, T+1], action mask [B, T+1]); tool tokens and
    padding are masked."""
    token, _ = _masks(log_pf, lengths, tool_mask)
    B, T = log_pf.shape
    idx = lengths.to(log_pf.device).long()[:, None]
    end = F.one_hot(idx.squeeze(1), T + 1).to(torch.bool) & terminated.to(log_pf.device)[:, None].to(torch.bool)
    lp = F.pad(torch.where(token, log_pf, torch.zeros_like(log_pf)), (0, 1))
    lp = torch.where(end, log_pterm.gather(1, idx).expand(-1, T + 1), lp)
    return lp, F.pad(token, (0, 1), value=False) | end
