# Two commands do all the set-up on a machine with only python3 and make:
#   make demo   build .venv, install Herald, build the demo shop, run the demo flows and
#               the demo journeys over ten simulated days
#   make test   build .venv if needed and run the whole test suite
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
CODE   := core audiences channels delivery reporting journeys flows

.PHONY: demo test lint bench reliability clean install browser

install: $(STAMP)

$(STAMP): pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -c requirements.lock -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/herald demo-data
	$(BIN)/herald validate
	$(BIN)/herald run winback
	$(BIN)/herald run welcome
	$(BIN)/herald run member_upgrade
	@echo "Simulating the week after the win-back campaign (demo data, see README):"
	$(BIN)/herald demo-data --simulate-response winback
	$(BIN)/herald report winback --html
	@echo "Journeys over ten simulated days, one tick a day at 10:00 Shanghai time (--now):"
	@day0=$$(date -u -d tomorrow +%Y-%m-%d); \
	for d in 0 1 2 3 4 5 6 7 8 9 10; do \
	    t=$$(date -u -d "$$day0 02:00 UTC + $$d days" +%Y-%m-%dT%H:%MZ); \
	    for j in churn_winback welcome_series; do \
	        $(BIN)/herald --now $$t journey tick $$j || exit 1; \
	    done; \
	    if [ $$d = 0 ]; then \
	        echo "Simulating who orders after entering (demo data, see README):"; \
	        $(BIN)/herald --now $$t demo-data --simulate-response churn_winback || exit 1; \
	        $(BIN)/herald --now $$t demo-data --simulate-response welcome_series || exit 1; \
	    fi; \
	done; \
	t=$$(date -u -d "$$day0 02:00 UTC + 10 days" +%Y-%m-%dT%H:%MZ); \
	for j in churn_winback welcome_series; do \
	    $(BIN)/herald --now $$t journey status $$j && $(BIN)/herald --now $$t journey report $$j --html || exit 1; \
	done
	@echo "Messages the demo would have sent are in .herald/outbox/ (nothing left this machine)."

# The HTML report's test drives a headless Chromium; without one it skips and says why.
# `make browser` installs Debian's package (as root with apt, ~25 s); CI runs it first.
browser:
	@if ! command -v chromium >/dev/null 2>&1 && [ "$$(id -u)" = 0 ] \
	    && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing chromium for the HTML report test"; \
	    export DEBIAN_FRONTEND=noninteractive; \
	    apt-get install -y -qq chromium >/dev/null 2>&1 \
	    || { apt-get update -qq >/dev/null && apt-get install -y -qq chromium >/dev/null; }; \
	fi

test: $(STAMP)
	$(BIN)/python -m pytest -q --durations=20

# mypy checks the package as it is imported (herald.core, herald.flows, ...): the folders
# are mapped onto herald.* by pyproject's package-dir, which mypy cannot read, so a tree
# of links under build/mypy gives it the same names; checked that way, an import of a
# name a module no longer has is an error instead of an unknown module.
lint: $(STAMP)
	$(BIN)/ruff check $(CODE) tests bench
	@rm -rf build/mypy && mkdir -p build/mypy/herald && touch build/mypy/herald/__init__.py
	@for p in $(CODE); do ln -s "$(CURDIR)/$$p" "build/mypy/herald/$$p"; done
	MYPYPATH=build/mypy $(BIN)/mypy -p herald

# The benchmark suite (bench/run.py): 100,000 and 1,000,000 recipients, SQLite and
# Postgres, each stage against its baseline; updates the figures in BENCHMARKS.md.
bench: $(STAMP)
	$(BIN)/python bench/run.py $(BENCH_ARGS)

# The reliability catalogue (tests/test_reliability.py, the journeys' faults in
# tests/test_journeys.py and the worker processes' in tests/test_processes.py, also part
# of make test): runs them and rewrites RELIABILITY.md with each entry's outcome and the
# totals.
reliability: $(STAMP)
	HERALD_CATALOGUE=build/catalogue.json $(BIN)/python -m pytest -q tests/test_reliability.py \
	    tests/test_journeys.py tests/test_processes.py
	$(BIN)/python -m tests.catalogue build/catalogue.json > RELIABILITY.md

clean:
	rm -rf $(VENV) .herald reports
