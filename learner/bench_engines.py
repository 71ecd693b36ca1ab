"""`gfnlm bench engines`: sampling tokens/s of the engines on the config's model with a LoRA adapter.

Workloads (exactly `--tokens` new tokens per sample, no end token, so tokens/s is well defined):
  shared-16, shared-64   one prompt (the task's), n = 16 and 64 samples
  distinct-16            16 different prompts, one sample each
Engines: `hf-generate` (transformers `generate`, the plain baseline), `transformers` (gfnlm's
engine: the prompt once, its KV cache repeated) and `vllm`. The vLLM engine takes the 16 distinct
prompts in one call (how vLLM batches); the transformers engine, one call per prompt. Also
printed: engine start-up seconds and LoRA swap seconds. All figures of one run come from the same
process, so their ratios are comparable even on a noisy machine.
"""

from __future__ import annotations

import time

import torch

from gfnlm.configs import ConfigError, load_config


def _random_adapter(policy, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    for name, p in policy.model.named_parameters():
        if "lora_B" in name:
            p.data = torch.randn(p.shape, generator=g) * 0.01
    return policy.adapter_state()


def _prompts(task, tokenizer, k: int) -> list[list[int]]:
    base = task.prompt_text(task.train_ids[0])
    return [tokenizer.encode(base.replace("100", str(100 + i)) if i else base, add_special_tokens=False) for i in range(k)]


def _time(fn, repeats: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main(args) -> int:
    from gfnlm.actors.sampler import TransformersSampler
    from gfnlm.actors.trajectory import PromptRequest
    from gfnlm.actors.models import resolve_model_path
    from gfnlm.actors.policy import Policy
    from gfnlm.rewards import make_task

    cfg = load_config(args.config, args.override)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    policy = Policy(cfg.model, cfg.lora)
    hf_start = time.perf_counter() - t0
    tok = policy.tokenizer
    task = make_task(cfg, tok)
    state = _random_adapter(policy)
    prompts = _prompts(task, tok, 16)
    L = args.tokens
    results: dict[str, dict[str, float]] = {}
    extra: dict[str, float] = {"transformers start-up s": hf_start}

    def record(engine, workload, seconds, samples):
        results.setdefault(engine, {})[workload] = samples * L / seconds

    if "hf-generate" in args.engines:
        model = policy.model
        model.eval()

        def hf(prompt, n):
            with torch.no_grad():
                model.generate(input_ids=torch.tensor([prompt]), do_sample=True, num_return_sequences=n,
                               max_new_tokens=L, min_new_tokens=L, pad_token_id=tok.pad_token_id)

        for n in (16, 64):
            record("hf-generate", f"shared-{n}", _time(lambda: hf(prompts[0], n), args.repeats), n)
        record("hf-generate", "distinct-16", _time(lambda: [hf(p, 1) for p in prompts], args.repeats), 16)

    if "transformers" in args.engines:
        eng = TransformersSampler(policy.model, policy.device, seed=0, pad_id=tok.pad_token_id)
        t0 = time.perf_counter()
        eng.load_weights(state, 1)
        extra["transformers LoRA swap s"] = time.perf_counter() - t0
        for n in (16, 64):
            record("transformers", f"shared-{n}", _time(lambda: eng.generate(0, prompts[0], n, 1.0, L, L, []), args.repeats), n)
        batch = [PromptRequest(i, p, 1) for i, p in enumerate(prompts)]
        record("transformers", "distinct-16", _time(lambda: eng.generate_batch(batch, L, L, []), args.repeats), 16)
        record("transformers", "distinct-16 loop",
               _time(lambda: [eng.generate(0, p, 1, 1.0, L, L, []) for p in prompts], args.repeats), 16)

    if "vllm" in args.engines:
        from gfnlm.actors.engines import context_length
        from gfnlm.actors.vllm_engine import VLLMSampler, build_llm, peft_config_dict
        from vllm import SamplingParams

        if cfg.vllm_lora_rank() is None:
            raise ConfigError(f"lora.r ({cfg.lora.r}) exceeds vLLM's largest LoRA rank; bench vLLM with a smaller lora.r")
        path = resolve_model_path(cfg.model.path)
        t0 = time.perf_counter()
        llm = build_llm(path, cfg.sampler.vllm, cfg.model.dtype, context_length(cfg, task.max_prompt_len(), task.max_len) + 32, 0,
                        max_lora_rank=cfg.vllm_lora_rank())
        extra["vllm start-up s"] = time.perf_counter() - t0
        eng = VLLMSampler(llm, peft_config_dict(path, cfg.lora), seed=0)
        swaps = []
        for v in range(1, 4):
            eng.load_weights(state, v)
            swaps.append(eng.last_swap_seconds)
        extra["vllm LoRA swap s"] = min(swaps)
        for n in (16, 64):
            record("vllm", f"shared-{n}", _time(lambda: eng.generate(0, prompts[0], n, 1.0, L, L, []), args.repeats), n)
        sp = SamplingParams(max_tokens=L, min_tokens=L, ignore_eos=True, logprobs=0, temperature=1.0)

        def distinct():
            llm.generate([{"prompt_token_ids": p} for p in prompts], sp, lora_request=eng.lora, use_tqdm=False)

        record("vllm", "distinct-16", _time(distinct, args.repeats), 16)
        if args.base_too:
            def base():
                llm.generate([{"prompt_token_ids": prompts[0]}], SamplingParams(n=64, max_tokens=L, min_tokens=L,
                             ignore_eos=True, logprobs=0), use_tqdm=False)

            record("vllm (no LoRA)", "shared-64", _time(base, args.repeats), 64)
        eng.close()

    workloads = ["shared-16", "shared-64", "distinct-16", "distinct-16 loop"]
    print(f"model {cfg.model.path}, LoRA r={cfg.lora.r} on {len(cfg.lora.target_modules)} module kinds, "
          f"{L} tokens per sample, {args.threads} torch thread(s), best of {args.repeats}")
    print(f"{'engine':<16}" + "".join(f"{w:>18}" for w in workloads) + "   (tokens/s)")
    for engine, row in results.items():
        print(f"{engine:<16}" + "".join(f"{row.get(w, float('nan')):>18.1f}" for w in workloads))
    if "transformers" in results:
        for engine, row in results.items():
            if engine != "transformers":
                ratios = [row[w] / results["transformers"][w] if w in row else float("nan") for w in workloads]
                print(f"{engine + ' / transformers':<16}" + "".join(f"{r:>18.2f}" for r in ratios))
    if "transformers" in results:
        row = results["transformers"]
        print(f"transformers engine, 16 distinct prompts in one call / one call per prompt: "
              f"{row['distinct-16'] / row['distinct-16 loop']:.2f}x")
    for k, v in extra.items():
        print(f"{k:<30}{v:>10.3f}")
    return 0
