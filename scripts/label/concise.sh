#!/usr/bin/env bash
# Concise, direct answers (1-3 sentences, under ~50 words, plain prose, no preamble or refusal).
# Rules: configs/rules/concise.yaml (edit a copy to fit your task).
#
#   scripts/label/concise.sh CANDIDATES.jsonl OUT_DIR [extra 'align pairs build' options]
#
# Writes OUT_DIR/judgements.jsonl, OUT_DIR/pairs.jsonl (DPO) and OUT_DIR/unpaired.jsonl (KTO),
# then checks both with 'align data validate'. Rerunning resumes the labeling.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
candidates="${1:?usage: $0 CANDIDATES.jsonl OUT_DIR}"
out="${2:?usage: $0 CANDIDATES.jsonl OUT_DIR}"
shift 2
align label rules "$candidates" --rules "$here/configs/rules/concise.yaml" -o "$out/judgements.jsonl"
align pairs build "$out/judgements.jsonl" -o "$out/pairs.jsonl" --unpaired "$out/unpaired.jsonl" "$@"
align data validate "$out/pairs.jsonl"
align data validate "$out/unpaired.jsonl"
