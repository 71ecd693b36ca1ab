"""The M-step of latent-rationale classification (paper §4.4): a second adapter learns p(Y | X Z).

The E-step is the ordinary GFlowNet update of the default adapter, q(Z | X). After the last
E-step (`schedule: after`, the authors'), or every `e_steps` E-steps (`alternate`), `m_steps`
optimizer steps train the adapter "m" on Z sampled from q for the training records: a two-way
cross-entropy over the label words, log p_m(Y_c | X Z) for each label c. Prediction classifies with
base + "m". The E-step's reward is the frozen base model (`e_reward: base`, the authors'), or base +
"m" (`e_reward: m`): then each M phase bumps the task's `reward_version` and the replay's older
log R is scored again when drawn. Two named adapters in one policy, each with its
own optimizer; the M adapter's weights and optimizer go into every checkpoint.
"""

from __future__ import annotations

import os
import time

import torch

from gfnlm.actors.policy import active_adapter, sequence_logprobs
from gfnlm.actors.trajectory import PromptRequest, Trajectory
from gfnlm.rewards.subjectivity import z_policy

M_ADAPTER = "m"


def label_logits(model, context_ids: list[int], trajectories: list[Trajectory], suffixes: list[list[int]],
                 pad_id: int) -> torch.Tensor:
    """[B, C]: log p(Y_c | X Z_b) under the model's active adapter, with gradients. X runs once; its
    cache is shared by every (Z_b, Y_c) row (`sequence_logprobs`, rows in length buckets), so a
    review's tokens are not run 2 × B times."""
    rows = [list(t.tokens) + list(y) for t in trajectories for y in suffixes]
    lengths = [len(r) for r in rows]
    dev = next(model.parameters()).device
    tokens = torch.full((len(rows), max(lengths)), pad_id, dtype=torch.long)
    for i, r in enumerate(rows):
        tokens[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    log_pf, _ = sequence_logprobs(model, list(context_ids), tokens.to(dev), [], lengths=lengths)
    out, i = [], 0
    for t in trajectories:
        for y in suffixes:
            out.append(log_pf[i, t.length: t.length + len(y)].sum())
            i += 1
    return torch.stack(out).view(len(trajectories), len(suffixes))


class MStep:
    """M phases: after the last E-step (`schedule: after`) or every `e_steps` steps (`alternate`).
    Prediction classifies with base + M; the E-step's reward uses M only with `e_reward: m`."""

    def __init__(self, policy, task, em_cfg, lora_cfg, seed: int = 0, total_steps: int = 0):
        self.policy, self.task, self.cfg = policy, task, em_cfg
        self.total_steps = total_steps
        self.params = policy.add_adapter(M_ADAPTER, lora_cfg)
        self.optimizer = torch.optim.AdamW(self.params, lr=em_cfg.m_lr, weight_decay=0.0)
        self.generator = torch.Generator().manual_seed(seed + 104729)
        use_m(task, em_cfg)
        self.phases = 0

    def due(self, step: int) -> bool:
        if self.cfg.e_steps <= 0:
            return False
        if self.cfg.schedule == "after":
            return step == self.total_steps
        return step % self.cfg.e_steps == 0

    def run(self, sampler) -> dict:
        """One M phase; the reward changes, so its version is bumped."""
        t0 = time.perf_counter()
        task, policy = self.task, self.policy
        losses, accs = [], []
        pad = policy.tokenizer.pad_token_id
        for _ in range(self.cfg.m_steps):
            ids = self.records()
            reqs = [PromptRequest(r, task.prompt_ids(r), self.cfg.m_samples) for r in ids]
            sampler.generator.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=self.generator)))
            with torch.no_grad(), z_policy(policy.model, self.cfg):
                samples = sampler.generate_batch(reqs, task.min_len, task.max_len, task.end_ids, sorted(task.banned_ids),
                                                 task.ban_penalty, first_banned_ids=sorted(task.first_banned_ids))
            self.optimizer.zero_grad(set_to_none=True)
            policy.model.train()
            with active_adapter(policy.model, M_ADAPTER):
                total, right, n = 0.0, 0, 0
                for rid in ids:
                    ts = [t for t in samples if t.record_id == rid]
                    if not ts:
                        continue
                    logits = label_logits(policy.model, task.context_ids(rid), ts,
                                          [task.label_suffix(rid, 0), task.label_suffix(rid, 1)], pad)
                    target = torch.full((len(ts),), task.label(rid), dtype=torch.long, device=logits.device)
                    loss = torch.nn.functional.cross_entropy(logits, target, reduction="sum")
                    loss.backward()
                    total += loss.item()
                    right += int((logits.argmax(1) == target).sum())
                    n += len(ts)
            torch.nn.utils.clip_grad_norm_(self.params, 1.0)
            self.optimizer.step()
            losses.append(total / max(n, 1))
            accs.append(right / max(n, 1))
        self.phases += 1
        if self.cfg.e_reward == "m":  # the reward changed: replayed log R is scored again when drawn
            task.reward_version += 1
        return {"m_loss": losses[-1], "m_train_accuracy": accs[-1], "m_seconds": time.perf_counter() - t0,
                "reward_version": task.reward_version}

    def records(self) -> list[int]:
        """The training records of one M step: every one, or `m_records` drawn without replacement."""
        ids = list(self.task.train_ids)
        k = self.cfg.m_records
        if k <= 0 or k >= len(ids):
            return ids
        return sorted(ids[i] for i in torch.randperm(len(ids), generator=self.generator)[:k].tolist())

    def state_dict(self) -> dict:
        from peft import get_peft_model_state_dict

        return {"weights": {k: v.detach().cpu().clone() for k, v in
                            get_peft_model_state_dict(self.policy.model, adapter_name=M_ADAPTER).items()},
                "optimizer": self.optimizer.state_dict(), "reward_version": self.task.reward_version,
                "phases": self.phases, "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(self.policy.model, state["weights"], adapter_name=M_ADAPTER)
        self.optimizer.load_state_dict(state["optimizer"])
        self.task.reward_version = state["reward_version"]
        self.phases = state["phases"]
        self.generator.set_state(state["generator"])


def load_m_adapter(policy, adapter_dir: str, lora_cfg, task) -> bool:
    """Load a checkpoint's M adapter (adapter_dir/m/) into the policy and make it part of the
    task's reward; False when the checkpoint has none."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    path = os.path.join(adapter_dir, M_ADAPTER, "adapter_model.safetensors")
    if not os.path.isfile(path):
        return False
    if M_ADAPTER not in policy.model.peft_config:
        policy.add_adapter(M_ADAPTER, lora_cfg)
    set_peft_model_state_dict(policy.model, load_file(path, device=str(policy.device)), adapter_name=M_ADAPTER)
    use_m(task, task.cfg.em)
    return True


def use_m(task, em_cfg) -> None:
    """The M adapter classifies (prediction); with `e_reward: m` it is part of the E-step's reward too."""
    task.classifier_adapter = M_ADAPTER
    if em_cfg.e_reward == "m":
        task.lm.adapter = M_ADAPTER  # equal to the base until trained
