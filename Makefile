# The two commands a newcomer needs:   make run   |   make test
PY := .venv/bin/python

.PHONY: run ablations test setup data lessons unit bench clean

setup:
	@bash scripts/setup.sh

# coco-mini: ../shared/coco-mini (this workplace) or $$MINBLIP2_DATA if present, else downloaded into data/coco-mini
data: setup
	@$(PY) -c "import sys; from minblip2.config import default_data_root as d; sys.exit(0 if (d()/'captions.jsonl').is_file() else 1)" \
	  || $(PY) data/download_coco_mini.py --out data/coco-mini

# the main job: stage 1 -> stage 2 -> evaluation, writes runs/coco-mini/ and results/coco-mini.json
# (the command minblip2-coco-mini; the module form also works in a .venv set up before the commands existed)
run: data
	$(PY) -m minblip2.tools.coco_mini

# what each piece is worth, at the main job's stage-2 steps: no ITG, no stage 1 (random / BERT start), a linear
# projection; writes runs/coco-mini/ and results/coco-mini-ablations.json (~30 min)
ablations: data
	$(PY) -m minblip2.tools.coco_mini --ablations

# everything CI runs: unit/parity/integration tests, then the lessons through nbval
test: data
	$(PY) -m pytest -q tests
	$(PY) -m pytest -q --nbval-lax --nbval-current-env lessons

unit: setup
	$(PY) -m pytest -q tests

# re-execute every lesson and its solutions in place (stores fresh outputs, clears `coco-data` cells)
lessons: data
	$(PY) scripts/execute_lessons.py lessons/*.ipynb lessons/solutions/*.ipynb

# speed benchmarks (~8 min on 2 quiet cores): rewrites bench/results.json and bench/results.md
bench: setup
	$(PY) bench/run.py

clean:
	rm -rf runs .pytest_cache
