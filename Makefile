# skipcache developer entry points. Everything runs inside a venv in the repo (.venv).
# Pins live here, not in pyproject.toml: the package itself accepts any recent torch.
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
TORCH  ?= torch==2.14.1 torchvision==0.29.1

.PHONY: install test test-fast demo benchmark benchmark-components gpu-check tiny-clip clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH)
	$(PIP) install -q -e '.[test]'
	touch $@

test: install            ## the whole suite (a few minutes on 2 CPU cores)
	$(PY) -m pytest

test-fast: install       ## unit tests only
	$(PY) -m pytest -m "not slow"

demo: install            ## cache -> tune -> eval on the built-in synthetic base-to-new task
	$(VENV)/bin/skipcache run pipelines/demo.toml

BENCH_ARGS ?= --threads 1  # as measured in docs/benchmark.md; `make benchmark BENCH_ARGS=` for torch's default threads
benchmark: install       ## every method on one workload (ViT-B/16, CPU; <= 15 min on 2 cores): report, JSON, plots in build/bench/cpu
	$(VENV)/bin/skipcache bench --preset cpu --out build/bench/cpu $(BENCH_ARGS)

benchmark-components: install  ## the tune step vs conventional FT, cache-stage and store throughput
	$(PY) -m skipcache.bench.components --model ViT-B-16 --out build/benchmark-components.json

# On a GPU machine. Installs nothing: pass a Python that already has the dependencies, e.g.
# `make gpu-check PY=python3`. Under 5 minutes on one H200; the report lands in build/gpu-check/.
gpu-check:               ## CUDA tests, the demo on CUDA, ViT-B-16 FT vs Skip Tuning step and tune-stage costs
	$(PY) -m pytest -m cuda -q -p no:cacheprovider tests/test_cuda.py
	rm -rf build/gpu-check/demo build/gpu-check/store   # fresh: cache and tune on CUDA, nothing read back
	$(PY) -m skipcache run pipelines/demo.toml --device cuda --out build/gpu-check/demo --root build/gpu-check/store
	$(PY) -m skipcache.bench.gpu_check --out build/gpu-check

tiny-clip: install       ## re-pretrain the shipped synth-vit weights from scratch (GPU: ~8 min)
	$(PY) -m skipcache.synthworld.pretrain --out build/tiny-clip --minutes 8 --device auto
	@echo "to ship it: cp build/tiny-clip/synth.safetensors skipcache/weights/synth-vit.safetensors (and update MODEL_CARD.md)"

clean:
	rm -rf build runs .pytest_cache
