# Every target creates the virtual environment it needs: `make demo` and
# `make test` work on a fresh clone with nothing but Python 3.11.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test typecheck bench gpu-smoke clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[ray,vision,dev,serve]'
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(PY) examples/demo.py

test: $(STAMP)
	$(PY) -m pytest -q

# mypy cannot follow setuptools' package-dir mapping (backends/ is installed
# as pipeline_ir.backends), so it checks a plain, non-editable install of
# the package: exactly the module tree users import.
typecheck: $(STAMP)
	rm -rf build/typecheck
	$(PY) -m pip install -q --no-deps --target build/typecheck .
	cd build/typecheck && ../../$(PY) -m mypy --strict --config-file ../../pyproject.toml -p pipeline_ir

bench: $(STAMP)
	$(PY) -m benchmarks

# The GPU machine's script, on CPU with tiny sizes and one logical GPU:
# it runs only on lent GPU machines, so CI keeps it from rotting.
gpu-smoke: $(STAMP)
	OUT=build/gpu_smoke $(PY) benchmarks/gpu/gpu_bench.py --cpu-smoke

clean:
	rm -rf build $(VENV) *.egg-info .mypy_cache .pytest_cache
