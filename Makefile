# fastft: the two quick-start commands.
#
#   make demo   # set up .venv if needed, then QLoRA SmolLM2-135M-Instruct on the shipped extraction task
#   make demo-tiny  # the embedded tiny random model (seconds)
#   make demo-gemma # QLoRA Gemma 3 270M (Google's base model, from PyPI) on the same extraction task
#   make test   # set up .venv (+ .venv-unsloth on CPU machines) if needed, then run the test suite
#   make gguf       # add llama-cpp-python to .venv (builds llama.cpp: ~9 min once) for fastft export k-quants
#   make test-gguf  # the export tests that run the files in llama.cpp (not part of `make test`)
#   make triton36   # the GPU machine's triton 3.6 beside .venv's (tests/test_kernel_compile.py compiles with both)
#
# Without an NVIDIA GPU the set-up installs torch 2.13.0 (the CPU build) and never CUDA wheels;
# with one (nvidia-smi works) it installs the gpu extra (unsloth, xformers).
# The tested version matrix is pinned here, in one place.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
HAS_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1)

TORCH_CPU   := torch==2.13.0
CORE_PINS   := transformers==5.17.0 peft==0.21.2 datasets==4.8.5 bitsandbytes==0.50.2 matplotlib==3.11.2 \
               accelerate==1.15.0 triton==3.9.0 gguf==0.19.0 sentencepiece==0.2.3 tensorboard==2.21.0
# the test extra's plugins for bench/gpu.sh's GPU tests (pytest-xdist, a per-test timeout)
CORE_PINS   += pytest-xdist==3.8.0 pytest-timeout==2.4.0
# and pytest-cov for python -m bench.coverage (its subprocess measurement is coverage's own, >= 7.10)
CORE_PINS   += pytest-cov==7.1.0
GGUF_PINS   := llama-cpp-python==0.3.36 diskcache==5.6.3
# The GPU machine's triton (beside its torch 2.11), installed without dependencies into a folder that
# tests/test_kernel_compile.py puts first on its compile worker's PYTHONPATH (torch 2.13 imports with it).
SIDE_TRITON := 3.6.0
# TRL 1.16 has the CPU path of SFTTrainer's fused LM-head loss; unsloth 2026.10.9 caps trl at 1.15
# (and patches that loss on CPU), so its matrix entry pins 1.15.
HF_PINS      := $(CORE_PINS) trl==1.16.0
UNSLOTH_PINS := $(CORE_PINS) trl==1.15.0 unsloth==2026.10.9 unsloth_zoo==2026.10.9 xformers==0.0.35

PIP := -m pip install --disable-pip-version-check -q

.PHONY: demo demo-tiny demo-gemma test test-gguf gguf setup clean triton36
demo: .venv/.done
	.venv/bin/fastft train recipes/smollm2-demo.yaml --overwrite

demo-gemma: .venv/.done
	.venv/bin/fastft train recipes/gemma3-270m-demo.yaml --overwrite

demo-tiny: .venv/.done
	.venv/bin/fastft train recipes/tiny-demo.yaml --overwrite

# Both suites run even when the first fails (one failure must not hide the other half); the target
# fails if either did, after printing which.
test: .venv/.done .venv/triton36/.done $(if $(HAS_GPU),,.venv-unsloth/.done)
	@core=0; .venv/bin/python -m pytest || core=$$?; \
	unsloth=skipped; \
	if [ -z "$(HAS_GPU)" ]; then unsloth=0; .venv-unsloth/bin/python -m pytest -m unsloth -p no:cacheprovider || unsloth=$$?; fi; \
	echo "make test: core suite exit $$core, unsloth suite exit $$unsloth (skipped with a GPU: the core venv has unsloth)"; \
	[ "$$core" = 0 ] && { [ "$$unsloth" = 0 ] || [ "$$unsloth" = skipped ]; }

setup: .venv/.done

triton36: .venv/triton36/.done

.venv/triton36/.done: .venv/.done Makefile
	rm -rf .venv/triton36
	.venv/bin/python $(PIP) --no-deps --target .venv/triton36 triton==$(SIDE_TRITON)
	PYTHONPATH=.venv/triton36 .venv/bin/python -c "import triton, torch; assert triton.__version__ == '$(SIDE_TRITON)', triton.__version__"
	touch $@

gguf: .venv/.gguf-done

# llama-cpp-python builds llama.cpp with CMake (CPU; set CMAKE_ARGS for CUDA/Metal, see its docs).
.venv/.gguf-done: .venv/.done
	.venv/bin/python $(PIP) -c .venv/constraints.txt $(GGUF_PINS)
	touch $@

test-gguf: .venv/.gguf-done
	.venv/bin/python -m pytest -m gguf -p no:cacheprovider

.venv/.done: pyproject.toml Makefile
	$(PYTHON) -m venv .venv
	.venv/bin/python $(PIP) --upgrade pip
ifeq ($(HAS_GPU),)
	printf '%s\n' $(TORCH_CPU) $(HF_PINS) > .venv/constraints.txt
	.venv/bin/python $(PIP) $(TORCH_CPU)
	.venv/bin/python $(PIP) -c .venv/constraints.txt -e '.[test]'
else
	printf '%s\n' $(UNSLOTH_PINS) > .venv/constraints.txt
	.venv/bin/python $(PIP) -c .venv/constraints.txt -e '.[gpu,test]'
endif
	touch $@

# CPU only: a second environment with unsloth's CPU backend, for the tests marked `unsloth`.
# PyPI's torchvision is not the CPU build and breaks `import unsloth` beside torch 2.13.0 CPU.
.venv-unsloth/.done: pyproject.toml Makefile
	$(PYTHON) -m venv .venv-unsloth
	.venv-unsloth/bin/python $(PIP) --upgrade pip
	printf '%s\n' $(TORCH_CPU) $(UNSLOTH_PINS) > .venv-unsloth/constraints.txt
	.venv-unsloth/bin/python $(PIP) $(TORCH_CPU)
	.venv-unsloth/bin/python $(PIP) -c .venv-unsloth/constraints.txt -e '.[gpu,test]'
	.venv-unsloth/bin/python -m pip uninstall -y -q torchvision
	touch $@

clean:
	rm -rf .venv .venv-unsloth outputs
