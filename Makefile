# Two commands do all set-up on a fresh clone (see README.md):
#   make demo   install, then train on generated captioned scenes, index, search, report recall; offline
#   make test   install, then run the test suite
PYTHON ?= python3
# pytest-xdist workers for the suite: much of it waits on subprocesses and servers, so 2 finish sooner than 1 on
# 2 cores; --dist loadscope keeps a module's tests (and its module fixtures) in one worker
TEST_WORKERS ?= 2
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Debian's Chromium, which the browser tests drive (tests/test_serve_browser.py): browser downloads cannot work here
CHROMIUM := /usr/bin/chromium
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: demo test lint bench emoji-set clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev]'
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps -c constraints.txt clip-benchmark
	touch $(STAMP)

# real camera RAW files (ExifTool's test images, from Debian's source package), which tests/test_formats.py reads
CAMERA_RAW := data/camera-raw/.fetched
$(CAMERA_RAW): $(STAMP) scripts/camera_raw.py
	$(BIN)/python scripts/camera_raw.py
	touch $@

$(CHROMIUM):
	$(SUDO) apt-get update -qq
	$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium > /dev/null

demo: $(STAMP)
	bash scripts/demo.sh

test: $(STAMP) lint $(CHROMIUM) $(CAMERA_RAW)
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadscope

# ruff (pyflakes, isort, bugbear, pyupgrade) and mypy over the whole tree, as configured in pyproject.toml
lint: $(STAMP)
	$(BIN)/ruff check clipengine tests benchmarks
	$(BIN)/mypy

bench: $(STAMP) emoji-set
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[bench]'
	$(BIN)/python benchmarks/run_all.py

# the emoji development set: four vendors' drawings and their names from npm, built offline once installed
emoji-set: $(STAMP)
	mkdir -p data/npm
	cp benchmarks/emoji/package.json data/npm/package.json
	cd data/npm && npm install --no-audit --no-fund --silent
	$(BIN)/python benchmarks/make_emoji_set.py

clean:
	rm -rf $(VENV) data runs
