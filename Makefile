# Single entry point. Every target creates/updates .venv itself (scripts/setup_env.sh).
PY := .venv/bin/python
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: setup main test full bench clean-outputs

setup:
	@bash scripts/setup_env.sh

## main: execute every notebook with papermill into outputs/main and write outputs/main/REPORT.md
main: setup
	$(PY) -m llm4gen_lite notebooks --out outputs/main

## test: the whole test suite (unit tests + every notebook in smoke mode)
test: setup
	$(PY) -m pytest

## full: the full reproduction (trains the variants two at a time, regenerates docs/RESULTS.md)
full: setup
	$(PY) scripts/reproduce.py --jobs 2 --ship

## bench: performance ratios, written to bench/results.json and docs/BENCHMARKS.md
bench: setup
	$(PY) bench/run_all.py

clean-outputs:
	rm -rf outputs
