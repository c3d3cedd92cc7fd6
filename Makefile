.PHONY: setup test demo
# One command each: set up a fresh machine (or reuse .venv/) and ...
setup:
	bash scripts/setup.sh
# ... pass the tests,
test:
	bash scripts/setup.sh --test
	.venv/bin/python -m pytest -q -ra
# ... or run the main job: build an ITDA on SmolLM2-135M offline and evaluate it.
demo: setup
	.venv/bin/sae-lens-itda demo
