# The two commands of the README: `make demo` and `make test`. Both install what they need first
# (scripts/setup.sh: .venv with CPU torch, unsloth, llama-cpp-python built with safe CPU flags;
# slow builds are cached in .cache/ so a rerun is quick).
VENV := .venv
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup demo test test-fast clean-demo

setup:
	bash scripts/setup.sh

demo: setup
	$(VENV)/bin/cpt-kit run recipes/demo.py

test: setup
	$(VENV)/bin/python -m pytest -q

test-fast: setup
	$(VENV)/bin/python -m pytest -q -m "not slow"

clean-demo:
	rm -rf runs/demo
