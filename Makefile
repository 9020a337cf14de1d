# Every install goes through constraints.txt so that torch stays on the local CPU build.
PIP ?= python -m pip
INSTALL = $(PIP) install -q -c constraints.txt -e ".[dev]"

.PHONY: install data-package demo test test-slow

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
