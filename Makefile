# Set-up is idempotent: the venv is built once, and reinstalled only when pyproject.toml changes.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.mm-llama-installed

.PHONY: install test demo clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider

# The built-in default: synthetic data, tokenizer, tiny LM, contrastive ViT and image adapter trained from
# scratch, evaluated on held-out images; writes runs/demo/report.html and runs/demo/metrics.json.
# Each `make demo` starts over (--overwrite removes only what an earlier demo wrote there); continue an
# interrupted run instead with `$(BIN)/mm-llama demo --out runs/demo --resume`.
demo: $(STAMP)
	$(BIN)/mm-llama demo --out runs/demo --overwrite

clean:
	rm -rf $(VENV) runs build *.egg-info
