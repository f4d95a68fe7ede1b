#!/usr/bin/env bash
# The GPU check (see benchmarks/gpu_check.py): DDP vs FSDP, bf16 pairs/s and peak memory on random-weight models of
# DeBERTa-v3-large's and Llama-3.2-1B's shapes, as ratios from one run, in under 8 minutes, with no network.
#   benchmarks/gpu_check.sh [OUT.json]          on a GPU machine (every GPU, one process each)
#   benchmarks/gpu_check.sh --tiny [OUT.json]   on the CPU at tiny shapes (what CI runs, a few seconds)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
ARGS=()
if [ "${1:-}" = "--tiny" ]; then ARGS+=(--tiny); shift; fi
OUT=${1:-gpu-check.json}
exec timeout 470 "$PY" benchmarks/gpu_check.py "${ARGS[@]}" --out "$OUT"
