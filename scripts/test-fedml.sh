#!/usr/bin/env bash
# Optional (`make test-fedml`, not part of `make test` or CI): the trainer adapter against the real FedML library.
#
# fedml==0.9.6 pins paho-mqtt 1.6.1, numpy 1.26.4, protobuf 3.20.3 and wandb 0.13.2, which cannot live beside
# fedsilo's own dependencies; and `import fedml` needs a torchvision that works, which torch 2.13.0 (fedsilo's pin)
# has none of. So FedML gets a virtualenv of its own, .venv-fedml (torch 2.14.1 + torchvision 0.29.1, several GB),
# and only the site's trainer runs there: the agent stays in .venv and starts the registered trainer with
# `python: .venv-fedml/bin/python` (agent/fedml_adapter.py, one request/response over stdin/stdout).
# setuptools<81: fedml imports pkg_resources, which setuptools 81 removed.
#
# Usage: scripts/test-fedml.sh [--build-only]       (the virtualenv is built once; delete it to rebuild)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv-fedml
stamp="$VENV/.fedml-ready"

if [ ! -f "$stamp" ]; then
  PY=${PYTHON:-python3.11}
  command -v "$PY" >/dev/null 2>&1 || PY=python3
  start=$(date +%s)
  rm -rf "$VENV"
  "$PY" -m venv "$VENV"
  printf '*\n' > "$VENV/.gitignore"  # keeps git, ruff and friends out of it
  "$VENV/bin/python" -m pip install -q --upgrade pip
  # One resolve, so that fedml's torch/torchvision requirement is met by this pair and nothing else.
  "$VENV/bin/python" -m pip install -q "torch==2.14.1" "torchvision==0.29.1" "fedml==0.9.6" "setuptools<81"
  "$VENV/bin/python" -W ignore -c 'import fedml; from fedml.core import ClientTrainer; print("fedml", fedml.__version__)'
  end=$(date +%s)
  echo "test-fedml: built $VENV in $((end - start)) s, $(du -sh "$VENV" | cut -f1) on disk"
  touch "$stamp"
fi
[ "${1:-}" = --build-only ] && exit 0

bash scripts/bootstrap.sh test
FEDSILO_FEDML_PYTHON="$PWD/$VENV/bin/python" .venv/bin/pytest -q -p no:cacheprovider tests/fedml/real_fedml_check.py
