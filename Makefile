# The two commands a newcomer runs on a fresh machine: `make run` and `make test`.
# Both create .venv and install flowbeam into it the first time.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
SAMPLE := sample/sample.pcap
# The Node test servers (kinesalite), pinned by tests/node/package-lock.json.
NODE_MODULES := tests/node/node_modules/.installed

.PHONY: run test lint install templates

install: $(VENV)/.installed $(NODE_MODULES)

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet --editable ".[test]"
	touch $@

# Without npm the kinesalite tests skip (and fail under .ci/run, which requires every server).
$(NODE_MODULES): tests/node/package-lock.json
	if command -v npm >/dev/null; then npm ci --prefix tests/node --ignore-scripts --no-audit \
		--no-fund --loglevel=error && touch $@; else echo "npm absent: kinesalite not installed"; fi

$(SAMPLE): | $(VENV)/.installed
	mkdir -p $(dir $@)
	$(BIN)/flowbeam generate --output $@

# The main job: the sample capture through the batch pipeline into the local sink (out/).
run: $(VENV)/.installed $(SAMPLE)
	$(BIN)/python -m pipelines.pcap_flows --input $(SAMPLE) --output out

lint: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/lint-imports --no-cache

test: lint $(NODE_MODULES)
	$(BIN)/python -m pytest

# The Dataflow images and flex templates (templates/build.sh; needs gcloud, REPOSITORY, BUCKET).
templates: $(VENV)/.installed
	templates/build.sh
