# Everything runs inside .venv, created on first use. Nothing is downloaded at run time.
PYTHON_SYSTEM ?= python3
VENV := .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed

.PHONY: install test demo bench clean

install: $(INSTALLED)

$(INSTALLED): setup.py pyproject.toml
	test -x $(PY) || $(PYTHON_SYSTEM) -m venv $(VENV)
	$(PY) -m pip install -q -e ".[dev]"
	touch $(INSTALLED)

# the import layers (pyproject.toml [tool.importlinter]) and the style, then the tests
test: $(INSTALLED)
	$(VENV)/bin/lint-imports
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q tests

demo: $(INSTALLED)
	$(PY) -m gift demo --publish .

bench: $(INSTALLED)
	$(PY) -m pytest -q bench -p no:cacheprovider
	rm -rf build/compile-check-ptx
	TRITON_INTERPRET=0 $(PY) -m gift_kernels.dev.compile_check --arch sm_80,sm_86,sm_89,sm_90,sm_100,sm_120 --jobs 2 \
		--json bench/results/compile_check.json --ptx-dir build/compile-check-ptx
	bash bench/ptxas_spills.sh build/compile-check-ptx $(PY) > bench/results/ptxas_spills.txt \
		|| (cat bench/results/ptxas_spills.txt; exit 1)
	tail -1 bench/results/ptxas_spills.txt

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
