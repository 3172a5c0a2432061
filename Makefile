# Two commands do all the set-up: `make demo` and `make test` create or refresh .venv from
# pyproject.toml (the stamp is older than pyproject.toml -> reinstall) and then run.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/mlx-localnorm demo

# pytest exits 5 when it collects no tests: that is a broken suite, not a pass.
test: $(STAMP)
	$(BIN)/python -m pytest -q -ra $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; exit 1; fi; exit $$rc

bench: $(STAMP)
	$(BIN)/mlx-localnorm bench norms

clean:
	rm -rf $(VENV) build *.egg-info
