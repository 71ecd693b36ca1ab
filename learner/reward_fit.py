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


def fit_texts(cfg, split: str = "train") -> list[str]:
    """The texts of a split's records (its template over each record's columns): the training
    records' texts the fit learns, or the validation records' it is measured on."""
    fit = cfg.reward.fit
    records = load_records(cfg.task.data, template_fields(fit.template))
    ids = records.train_ids if split == "train" else records.validation_ids
    return [fit.template.format(**records[r].fields) for r in ids]


def fit_key(cfg, texts: list[str]) -> str:
    """What decides the fitted model: the base model's files, the texts and the fit's settings
    (with `keep_best`, the validation texts too; without it, the settings of the validation
    measurement are left out, as they change only the log)."""
    base = resolve_model_path(cfg.model.path, log=lambda *_: None)
    files = sorted((name, os.path.getsize(os.path.join(base, name))) for name in os.listdir(base)
                   if os.path.isfile(os.path.join(base, name)))
    fit = cfg.reward.fit
    settings = fit.model_dump(mode="json", exclude={"policy_starts_here"} |
                              (set() if fit.keep_best else {"validation_every", "keep_best", "patience"}))
    content = {"base": os.path.realpath(base), "files": files, "texts": texts, "dtype": cfg.model.dtype,
               "targets": list(cfg.lora.target_modules), "fit": settings}
    if fit.keep_best:
        content["validation"] = fit_texts(cfg, "validation")
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]


def padded(encoded: list[list[int]], pad: int, device):
    """(ids, attention mask, labels with -100 on the padding) of token lists padded to the longest."""
    width = max(map(len, encoded))
    ids = torch.tensor([b + [pad] * (width - len(b)) for b in encoded], device=device)
    mask = torch.tensor([[1] * len(b) + [0] * (width - len(b)) for b in encoded], device=device)
    return ids, mask, ids.masked_fill(mask == 0, -100)


@torch.no_grad()
def mean_nll(model, encoded: list[list[int]], pad: int, batch_size: int = 16) -> float:
    """NLL per token of the texts under the model (every token after the first, the end token
    included): the model's own mean loss of each batch, weighted by the batch's tokens."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(encoded), batch_size):
        ids, mask, labels = padded(encoded[i:i + batch_size], pad, model.device)
        tokens = int((labels[:, 1:] != -100).sum())
        total += model(input_ids=ids, attention_mask=mask, labels=labels).loss.item() * tokens
        count += tokens
    model.train(was_training)
    return total / count


def fit(cfg, texts: list[str], folder: str, log=print, validation: list[str] | None = None) -> dict:
    """LoRA SFT of the base model on `texts` (the mean NLL of their tokens), merged and saved to folder.
    With `validation` texts their NLL is measured every `validation_every` steps; with `keep_best`
    the LoRA of the lowest is the one merged (and the fit stops `patience` measurements after it)."""
    from peft import LoraConfig, get_peft_model

    f = cfg.reward.fit
    torch.manual_seed(f.seed)
    model, tok = load_model(cfg.model.path, pick_device(cfg.model.device), cfg.model.dtype)
    model = get_peft_model(model, LoraConfig(r=f.r, lora_alpha=2 * f.r, target_modules=list(cfg.lora.target_modules),
                                             lora_dropout=0.0, bias="none"))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=f.lr, weight_decay=0.0)
    rng = random.Random(f.seed)
    def encode(ts: list[str]) -> list[list[int]]:
        return [list(tok(t).input_ids) + [tok.eos_token_id] for t in ts]

    def kept() -> list | None:  # the LoRA now, when the fit may come back to it
        return [p.detach().clone() for p in params] if f.keep_best else None

    encoded, held = encode(texts), encode(validation or [])
    pad = tok.pad_token_id
    curve = [(0, mean_nll(model, held, pad))] if held else []
    best, since_best = (0, kept()), 0
    model.train()
    losses, t0 = [], time.perf_counter()
    for step in range(f.steps):
        ids, mask, labels = padded([encoded[rng.randrange(len(encoded))] for _ in range(f.batch_size)], pad, model.device)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(loss.item())
        if (step + 1) % 50 == 0 or step + 1 == f.steps:
            log(f"gfnlm: reward fit step {step + 1}/{f.steps}: NLL per token {sum(losses[-50:]) / len(losses[-50:]):.3f}")
        if held and ((step + 1) % f.validation_every == 0 or step + 1 == f.steps):
            curve.append((step + 1, mean_nll(model, held, pad)))
            lowest = min(nll for _, nll in curve[:-1])
            log(f"gfnlm: reward fit step {step + 1}/{f.steps}: validation NLL per token {curve[-1][1]:.3f} "
                f"({len(held)} texts; lowest so far {min(lowest, curve[-1][1]):.3f})")
            if curve[-1][1] < lowest:
                best, since_best = (step + 1, kept()), 0
            else:
                since_best += 1
            if f.keep_best and since_best >= f.patience:
                log(f"gfnlm: reward fit: stopped at step {step + 1}, {f.patience} measurements past the lowest "
                    f"validation NLL (step {best[0]})")
                break
    if f.keep_best and held:
        with torch.no_grad():
            for p, value in zip(params, best[1]):
                p.copy_(value)
    merged = model.merge_and_unload()
    tmp = folder + ".part"
    shutil.rmtree(tmp, ignore_errors=True)
    merged.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    info = {"texts": len(texts), "steps": f.steps, "steps_run": len(losses), "first_loss": losses[0],
            "last_loss": losses[-1], "seconds": time.perf_counter() - t0, "base": cfg.model.path,
            "fit": f.model_dump(mode="json"), "validation_texts": len(held),
            "validation_nll": [[s, round(v, 4)] for s, v in curve],
            "kept_step": best[0] if f.keep_best and held else len(losses)}
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
            info = fit(cfg, texts, folder, log, validation=fit_texts(cfg, "validation"))
            kept = f"; kept step {info['kept_step']}" if cfg.reward.fit.keep_best else ""
            log(f"gfnlm: reward fit: NLL per token {info['first_loss']:.3f} -> {info['last_loss']:.3f} "
                f"in {info['seconds']:.0f} s{kept}")
    return with_fitted(cfg, folder)
