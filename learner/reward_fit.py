"""The reward LM fitted by SFT on the training records' text (`reward.fit`), once per content.

The paper's infilling reward is the base model fine-tuned on the training stories, and the policy
starts from that model too. `fitted_config` returns the config with the fitted model in place
(`model.path` and/or `reward.model`) and `reward.fit` cleared, so the run's config.yaml names the
model it used; the fit itself (a LoRA trained on the texts, merged into the weights) is saved into
$GFNLM_HOME/fitted/<hash> and reused whenever the base model, the texts and the settings are the same.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import time

import torch

from gfnlm.actors.models import gfnlm_home, load_model, pick_device, resolve_model_path
from gfnlm.configs.tasks import template_fields
from gfnlm.rewards.records import load_records

from .locks import file_lock


def fit_texts(cfg) -> list[str]:
    """The training records' texts the fit learns (its template over each record's columns)."""
    fit = cfg.reward.fit
    records = load_records(cfg.task.data, template_fields(fit.template))
    return [fit.template.format(**records[r].fields) for r in records.train_ids]


def fit_key(cfg, texts: list[str]) -> str:
    """What decides the fitted model: the base model's files, the texts and the fit's settings."""
    base = resolve_model_path(cfg.model.path, log=lambda *_: None)
    files = sorted((name, os.path.getsize(os.path.join(base, name))) for name in os.listdir(base)
                   if os.path.isfile(os.path.join(base, name)))
    blob = json.dumps({"base": os.path.realpath(base), "files": files, "texts": texts, "dtype": cfg.model.dtype,
                       "targets": list(cfg.lora.target_modules), "fit": cfg.reward.fit.model_dump(mode="json", exclude={"policy_starts_here"})},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def fit(cfg, texts: list[str], folder: str, log=print) -> dict:
    """LoRA SFT of the base model on `texts` (the mean NLL of their tokens), merged and saved to folder."""
    from peft import LoraConfig, get_peft_model

    f = cfg.reward.fit
    torch.manual_seed(f.seed)
    model, tok = load_model(cfg.model.path, pick_device(cfg.model.device), cfg.model.dtype)
    model = get_peft_model(model, LoraConfig(r=f.r, lora_alpha=2 * f.r, target_modules=list(cfg.lora.target_modules),
                                             lora_dropout=0.0, bias="none"))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=f.lr, weight_decay=0.0)
    rng = random.Random(f.seed)
    encoded = [list(tok(t).input_ids) + [tok.eos_token_id] for t in texts]
    pad = tok.pad_token_id
    model.train()
    losses, t0 = [], time.perf_counter()
    for step in range(f.steps):
        batch = [encoded[rng.randrange(len(encoded))] for _ in range(f.batch_size)]
        width = max(map(len, batch))
        ids = torch.tensor([b + [pad] * (width - len(b)) for b in batch], device=model.device)
        mask = torch.tensor([[1] * len(b) + [0] * (width - len(b)) for b in batch], device=model.device)
        labels = ids.masked_fill(mask == 0, -100)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(loss.item())
        if (step + 1) % 50 == 0 or step + 1 == f.steps:
            log(f"gfnlm: reward fit step {step + 1}/{f.steps}: NLL per token {sum(losses[-50:]) / len(losses[-50:]):.3f}")
    merged = model.merge_and_unload()
    tmp = folder + ".part"
    shutil.rmtree(tmp, ignore_errors=True)
    merged.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    info = {"texts": len(texts), "steps": f.steps, "first_loss": losses[0], "last_loss": losses[-1],
            "seconds": time.perf_counter() - t0, "base": cfg.model.path, "fit": f.model_dump(mode="json")}
    with open(os.path.join(tmp, "gfnlm_fit.json"), "w") as fh:
        json.dump(info, fh, indent=1)
    os.replace(tmp, folder)
    return info


def fit_folder(cfg) -> str:
    """Where the model that cfg's `reward.fit` yields lives (named by the content it is fitted to)."""
    return os.path.join(gfnlm_home(), "fitted", fit_key(cfg, fit_texts(cfg)))


def with_fitted(cfg, folder: str):
    """cfg with the fitted model in folder in place of `reward.fit`: in `model.path` (policy_starts_here)
    or in `reward.model`."""
    if cfg.reward.fit.policy_starts_here:
        model = cfg.model.model_copy(update={"path": folder})
        reward = cfg.reward.model_copy(update={"fit": None})
    else:
        model = cfg.model
        reward = cfg.reward.model_copy(update={"fit": None, "model": folder})
    return cfg.model_copy(update={"model": model, "reward": reward})


def fit_lock(folder: str, log=print):
    """Held while one process fits into `folder`: another process (e.g. an experiment split by
    `--runs`) that needs the same fit waits for it and then reuses it instead of fitting it twice."""
    return file_lock(folder + ".lock", wait=True,
                     on_wait=lambda: log(f"gfnlm: reward fit: another process is fitting {folder}; waiting for it"))


def fitted_config(cfg, log=print):
    """cfg with `reward.fit` done (`with_fitted`). Fits first when no fitted model of this content exists."""
    if cfg.reward.fit is None:
        return cfg
    texts = fit_texts(cfg)
    folder = fit_folder(cfg)
    with fit_lock(folder, log):
        if os.path.isfile(os.path.join(folder, "gfnlm_fit.json")):
            log(f"gfnlm: reward fit: reusing {folder}")
        else:
            log(f"gfnlm: reward fit: SFT of the base model on {len(texts)} training texts, {cfg.reward.fit.steps} steps "
                f"(once; saved in {folder})")
            info = fit(cfg, texts, folder, log)
            log(f"gfnlm: reward fit: NLL per token {info['first_loss']:.3f} -> {info['last_loss']:.3f} "
                f"in {info['seconds']:.0f} s")
    return with_fitted(cfg, folder)
