#!/usr/bin/env bash
# The main job: train the baseline reward model on the shipped multi-domain sample with the embedded MiniLM,
# evaluate it per domain on the held-out pairs, show its size, and score one example.
# Rerunning resumes (a killed demo continues from its last checkpoint; a finished one is only re-evaluated).
set -euo pipefail
cd "$(dirname "$0")/.."
RUN="${1:-runs/demo}"
MOERM=".venv/bin/moerm"

echo "== moerm demo: baseline RM on examples/data (8 domains), embedded MiniLM, CPU"
"$MOERM" data stats examples/data --split test
"$MOERM" train -c configs/demo.yaml --data examples/data --out "$RUN" --resume
"$MOERM" eval "$RUN" --data examples/data
"$MOERM" info "$RUN"
echo "== scoring one example (a helpful and a dismissive reply to the same prompt)"
PROMPT="Human: How do I keep my basil plant alive indoors?"
"$MOERM" score "$RUN" --prompt "$PROMPT" --response "Put it in a sunny window with at least six hours of light, water it when the top inch of soil is dry, and pinch off flower buds so it keeps growing leaves."
"$MOERM" score "$RUN" --prompt "$PROMPT" --response "I don't know, plants die sometimes."
