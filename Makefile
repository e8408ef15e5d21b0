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

# Until the demo issue lands, the demo writes a tiny *random* Llama 3 checkpoint (with a BPE tokenizer
# trained on a few built-in sentences) and generates from it: the text it prints is noise by design.
demo: $(STAMP)
	$(BIN)/python -m mm_llama.tiny_checkpoint runs/tiny-random
	$(BIN)/mm-llama generate --checkpoint runs/tiny-random --prompt "A red circle" --max-new-tokens 16

clean:
	rm -rf $(VENV) runs build *.egg-info
