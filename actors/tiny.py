"""Tiny random models with a character-level tokenizer, built offline (tests and benchmarks)."""

from __future__ import annotations

import torch

CHARS = [chr(c) for c in range(32, 127)] + ["\n"]
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]


def build_tokenizer(folder: str, chars: list[str] | None = None):
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS + (CHARS if chars is None else list(chars)))}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tk.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    tok.save_pretrained(folder)
    return tok


def build_model(folder: str, kind: str, seed: int = 0, hidden: int = 32, heads: int = 4, chars: list[str] | None = None):
    """A tiny random model (over `chars`, default printable ASCII). vLLM's CPU attention needs
    head_dim = hidden / heads >= 32."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    tok = build_tokenizer(folder, chars)
    torch.manual_seed(seed)
    vocab = len(tok)
    if kind == "llama":
        cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                          num_hidden_layers=2, num_attention_heads=heads, num_key_value_heads=max(1, heads // 2), max_position_embeddings=256,
                          pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
        model = LlamaForCausalLM(cfg)
    else:
        cfg = GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, n_positions=256,
                         pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
        model = GPT2LMHeadModel(cfg)
    model.save_pretrained(folder)
    return folder
