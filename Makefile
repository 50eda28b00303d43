# poelm: `make demo` runs the main job on the embedded corpus, `make test` runs the tests.
# Both set up .venv on first use (torch pinned to the CPU wheel in requirements.txt).
PY := .venv/bin/python
STAMP := .venv/.installed

.PHONY: setup test demo bench clean

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

setup: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -x --durations=15 tests

demo: $(STAMP)
	$(PY) -m poelm experiment tiny --out runs/demo
	@echo "report: runs/demo/report.md (plots and results.json beside it)"

bench: $(STAMP)
	$(PY) benchmarks/train_throughput.py
	$(PY) benchmarks/decode.py

clean:
	rm -rf .venv .pytest_cache
