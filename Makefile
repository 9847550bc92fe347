# The two commands a newcomer runs on a fresh machine: `make run` and `make test`.
# Both create .venv and install flowbeam into it the first time.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
SAMPLE := sample/sample.pcap

.PHONY: run test lint install

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet --editable ".[test]"
	touch $@

$(SAMPLE): | $(VENV)/.installed
	mkdir -p $(dir $@)
	$(BIN)/flowbeam generate --output $@

# The main job: the sample capture through the batch pipeline into the local sink (out/).
run: $(VENV)/.installed $(SAMPLE)
	$(BIN)/python -m pipelines.pcap_flows --input $(SAMPLE) --output out

lint: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/lint-imports --no-cache

test: lint
	$(BIN)/python -m pytest
