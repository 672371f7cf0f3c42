# Two commands do all the set-up on a machine with only python3 and make:
#   make demo   build .venv, install Herald, build the demo shop and run the demo flow
#   make test   build .venv if needed and run the whole test suite
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test lint bench clean install

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
	$(BIN)/herald report
	@echo "Messages the demo would have sent are in .herald/outbox/ (nothing left this machine)."

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check flows channels audiences templates tests
	$(BIN)/mypy flows channels audiences templates

clean:
	rm -rf $(VENV) .herald
