"""The learner's teacher-forced pass over many prompts with a row or two each (SFT's batches) runs
every row joined to its prompt in one pass: the same log-probs and gradients as a pass per prompt."""

import pytest
import torch
from torch.testing import assert_close

from gfnlm.actors.policy import joined_is_cheaper
from gfnlm.actors.trajectory import Trajectory

from test_policy_sampler import make_policy

PROMPTS = ["Pick a number: ", "x: ", "A longer prompt, with more to read: ", "Q? "]
ROWS = [["42", "7."], ["1"], ["", "100 and 3."], ["9-9 = 0"]]


def groups_of(policy, rows=ROWS):
    tok = policy.tokenizer
    return [(tok.encode(p), [Trajectory(r, tok.encode(s, add_special_tokens=False)) for s in seqs])
            for r, (p, seqs) in enumerate(zip(PROMPTS, rows))]


def both_ways(policy, groups, end, **rules):
    """(joined, per prompt): `logprobs_groups` with each path forced, and each one's gradients."""
    out = []
    params = policy.trainable_parameters()
    for joined in (True, False):
        policy.join_rows = joined
        log_pf, log_pterm, lengths, tool = policy.logprobs_groups(groups, end, **rules)
        pf_mask = torch.arange(log_pf.shape[1])[None, :] < lengths[:, None]
        pt_mask = (torch.arange(log_pterm.shape[1])[None, :] <= lengths[:, None]) & torch.isfinite(log_pterm)
        total = torch.where(pf_mask, log_pf, 0).sum() + torch.where(pt_mask, log_pterm, 0).sum()
        out.append((log_pf, log_pterm, lengths, tool, torch.autograd.grad(total, params)))
    return out


def check_same(joined, shared):
    lengths = shared[2]
    assert torch.equal(joined[2], lengths) and torch.equal(joined[3], shared[3])
    for b, n in enumerate(lengths.tolist()):
        assert_close(joined[0][b, :n], shared[0][b, :n], atol=1e-5, rtol=1e-5)
        assert_close(joined[1][b, : n + 1], shared[1][b, : n + 1], atol=1e-5, rtol=1e-5)
    for g, w in zip(joined[4], shared[4]):
        assert_close(g, w, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("split", [True, False], ids=["head-on-states", "logits-to-keep"])
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_joined_rows_equal_a_pass_per_prompt(kind, split, tiny_llama, tiny_gpt2, monkeypatch):
    """Prompts of different lengths, rows of different lengths (an empty one too): the same log q of
    every token and every state's ⊤, and the same gradients, under min_len, the first-token rule,
    a finite ban and a can_end rule; with the LM head run on each row's states alone, or (a model
    whose head is not a plain linear layer) on the positions some row needs."""
    import gfnlm.actors.policy as module

    if not split:
        monkeypatch.setattr(module, "body_and_head", lambda model: None)
    policy = make_policy(tiny_llama if kind == "llama" else tiny_gpt2, kind)
    tok = policy.tokenizer
    end = [tok.convert_tokens_to_ids(".")]
    groups = groups_of(policy)
    joined, shared = both_ways(policy, groups, end)
    check_same(joined, shared)
    assert torch.isfinite(joined[0][0, :2]).all()
    rules = {"banned_ids": [tok.convert_tokens_to_ids("z")], "ban_penalty": 3.0, "min_len": 2,
             "first_banned_ids": [tok.convert_tokens_to_ids("x")],
             "can_end": lambda t: [k >= 1 and k != 2 for k in range(t.length + 1)]}
    joined, shared = both_ways(policy, groups, end, **rules)
    check_same(joined, shared)
    assert joined[1][0, 2].item() == -float("inf")  # s_2 cannot end in either


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_joined_rows_through_the_allowed_head_columns(kind, tiny_llama, tiny_gpt2):
    """With most of the vocabulary banned the head runs over the allowed columns alone; joined or
    not, the same values, a banned token in a row still impossible."""
    from gfnlm.actors.policy import allowed_head

    policy = make_policy(tiny_llama if kind == "llama" else tiny_gpt2, kind)
    tok = policy.tokenizer
    allowed = [tok.convert_tokens_to_ids(c) for c in "0123456789.=+- "]
    banned = sorted(set(range(len(tok))) - set(allowed))
    assert allowed_head(policy.model, banned) is not None
    groups = groups_of(policy, [["42", "7."], ["1"], ["", "100 a"], ["9-9 = 0"]])
    joined, shared = both_ways(policy, groups, [tok.convert_tokens_to_ids(".")], banned_ids=banned)
    check_same(joined, shared)
    assert joined[0][4, 4].item() == shared[0][4, 4].item() == -float("inf")  # "a" (row 4, token 4) is banned


def test_the_joined_pass_is_chosen_for_many_prompts_with_few_rows():
    """SFT's 16 records with a reference each run joined; a GFlowNet batch of 2 prompts x 8 samples,
    or one prompt, shares each prompt's cache."""
    assert joined_is_cheaper([60] * 16, [[14]] * 16)
    assert not joined_is_cheaper([60] * 2, [[14] * 8] * 2)
    assert not joined_is_cheaper([60], [[14]])
