# Set-up is idempotent: the venv is built once, and rebuilt only when the lock or pyproject.toml changes.
# Every package comes from requirements.lock (exact versions and hashes), so a new release on the registry
# cannot change what a fresh machine installs.
# --no-cache-dir: the torch family is ~5 GB installed; a second copy in pip's wheel cache can fill a small CI disk.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.mm-llama-installed
# uv resolves the lock (`make lock`); it is a well-kept resolver that writes one universal, hashed file.
UV_VERSION := 0.13.9
LOCK_TOOLS := .lock-tools
# Browsers the report's browser test accepts (tests/train/headless_chromium.py, BROWSERS).
BROWSERS := chromium chromium-browser google-chrome

.PHONY: install test demo lock clean chromium

install: $(STAMP) chromium

$(STAMP): pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --no-cache-dir --no-deps --require-hashes -r requirements.lock
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	$(BIN)/python -m pip check
	touch $(STAMP)

test: $(STAMP) chromium
	$(BIN)/python -m pytest -q -p no:cacheprovider

# Headless Chromium for tests/train/test_report_browser.py (every image, clip and utterance of the demo report
# must load): Debian's package without its recommended extras, installed only when none of BROWSERS is on PATH.
# apt-get needs root, as on a CI machine; elsewhere install one of them yourself.
chromium:
	@for b in $(BROWSERS); do command -v $$b >/dev/null && exit 0; done; \
	apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium

# The built-in default: synthetic data, tokenizer, one tiny LM, then image, video and speech adapters trained
# from scratch onto it, each evaluated held out with its control; writes runs/demo/report.html and
# runs/demo/metrics.json (`$(BIN)/mm-llama demo --modality image` for the image path alone).
# Each `make demo` starts over (--overwrite removes only what an earlier demo wrote there); continue an
# interrupted run instead with `$(BIN)/mm-llama demo --out runs/demo --resume`.
demo: $(STAMP)
	$(BIN)/mm-llama demo --out runs/demo --overwrite

# Re-resolve requirements.lock after a change to the dependencies in pyproject.toml (needs the network):
# the newest releases that satisfy pyproject.toml and requirements-build.in, for Python 3.11 on every platform.
lock:
	test -x $(LOCK_TOOLS)/bin/uv || ($(PYTHON) -m venv $(LOCK_TOOLS) && $(LOCK_TOOLS)/bin/pip install --quiet uv==$(UV_VERSION))
	$(LOCK_TOOLS)/bin/uv pip compile pyproject.toml requirements-build.in --extra test --universal \
		--python-version 3.11 --generate-hashes --custom-compile-command "make lock" -o requirements.lock

clean:
	rm -rf $(VENV) $(LOCK_TOOLS) runs build *.egg-info
