#!/usr/bin/env bash
# The main job: on the shipped 8-domain sample, with the embedded MiniLM on CPU, train
#   1. the baseline RM (one RM fine-tuned on all domains), and
#   2. RODOS (a router over the prompt + one RM per domain, each trained on its own domain only),
# evaluate both per domain on the same held-out pairs, show their sizes, and score one example with each.
# Rerunning resumes (a killed demo continues from its last checkpoints; a finished one is only re-evaluated).
set -euo pipefail
cd "$(dirname "$0")/.."
RUN="${1:-runs/demo}"
MOERM=".venv/bin/moerm"

echo "== moerm demo: baseline and RODOS reward models on examples/data (8 domains), embedded MiniLM, CPU"
"$MOERM" data stats examples/data --split test
echo "== training the baseline (all domains in one RM)"
"$MOERM" train -c configs/demo.yaml --data examples/data --out "$RUN/baseline" --resume --no-eval
echo "== training RODOS (one RM per domain, then the router)"
"$MOERM" train -c configs/demo-rodos.yaml --data examples/data --out "$RUN/rodos" --resume --no-eval
echo "== held-out accuracy per domain, side by side"
"$MOERM" eval "$RUN/baseline" "$RUN/rodos" --data examples/data --out "$RUN/eval"
"$MOERM" info "$RUN/baseline"
"$MOERM" info "$RUN/rodos"
echo "== scoring one example (a helpful and a dismissive reply to the same prompt)"
PROMPT="Human: How do I keep my basil plant alive indoors?"
GOOD="Put it in a sunny window with at least six hours of light, water it when the top inch of soil is dry, and pinch off flower buds so it keeps growing leaves."
BAD="I don't know, plants die sometimes."
for sys in baseline rodos; do
  echo "-- $sys"
  "$MOERM" score "$RUN/$sys" --prompt "$PROMPT" --response "$GOOD"
  "$MOERM" score "$RUN/$sys" --prompt "$PROMPT" --response "$BAD"
done
