#!/bin/sh
# Install recsys-moe (the serving and PostgreSQL extras) into the current Python environment, the
# one way it is installed everywhere: the Dockerfile runs this file, and tests/test_install.py
# runs it into a fresh virtualenv, so the image's install cannot drift from the tested one.
#
#   sh deploy/install.sh [SOURCE]     SOURCE: the project checkout (default: .)
#
# TORCH_INDEX: an index holding the CPU torch build (default: PyTorch's CPU index; empty: pip's
# own configuration already provides it). Without it pip would take PyPI's multi-GB CUDA build.
set -eu
SOURCE=${1:-.}
TORCH_INDEX=${TORCH_INDEX-https://download.pytorch.org/whl/cpu}
PIP="python -m pip install --disable-pip-version-check --no-cache-dir --no-compile -q"
# 1. torch first and alone: the CPU build.
$PIP ${TORCH_INDEX:+--extra-index-url "$TORCH_INDEX"} -r "$SOURCE/requirements/torch.txt"
# 2. fbgemm's CPU build and torchrec without its CUDA fbgemm-gpu dependency.
$PIP --no-deps -r "$SOURCE/requirements/torchrec.txt"
# 3. the project, every dependency held to the tested pins.
$PIP -c "$SOURCE/requirements/torch.txt" -c "$SOURCE/requirements/lock.txt" "$SOURCE[serving,postgres]"
python -c "import sys, torch; sys.exit(f'a CUDA torch was installed ({torch.__version__})' if torch.version.cuda else 0)"
