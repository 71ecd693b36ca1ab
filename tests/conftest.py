"""Fixtures: tiny random Llama and GPT-2 models with a character-level tokenizer, built offline."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

torch.set_num_threads(1)

CHARS = [chr(c) for c in range(32, 127)] + ["\n"]
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]


def build_tokenizer(folder: str):
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS + CHARS)}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tk.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    tok.save_pretrained(folder)
    return tok


def build_model(folder: str, kind: str, seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    tok = build_tokenizer(folder)
    torch.manual_seed(seed)
    vocab = len(tok)
    if kind == "llama":
        cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                          pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
        model = LlamaForCausalLM(cfg)
    else:
        cfg = GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, n_positions=256,
                         pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
        model = GPT2LMHeadModel(cfg)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> str:
    return build_model(str(tmp_path_factory.mktemp("tiny-llama")), "llama")


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory) -> str:
    return build_model(str(tmp_path_factory.mktemp("tiny-gpt2")), "gpt2")


LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GPT2_TARGETS = ["c_attn", "c_proj", "c_fc"]


def tiny_overrides(model_dir: str, run_dir, targets=LLAMA_TARGETS, **extra) -> list[str]:
    """Overrides that make a fast run of the random-number preset on a tiny model."""
    ov = {
        "model.path": model_dir,
        "lora.target_modules": "[" + ",".join(targets) + "]",
        "lora.r": 4,
        "batch.size": 8,
        "learner.steps": 3,
        "learner.warmup_steps": 0,
        "learner.lr": 1e-2,
        "eval.num_samples": 20,
        "eval.batch_size": 10,
        "run.output_dir": str(run_dir),
        "run.progress": False,
        "run.checkpoint_every": 2,
        "task.target": "{type: uniform, low: 0, high: 20}",
        "task.max_len": 2,
        "replay.capacity_per_prompt": 32,
    }
    ov.update(extra)
    return [f"{k}={v}" for k, v in ov.items()]
