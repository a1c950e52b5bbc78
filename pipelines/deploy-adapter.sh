#!/usr/bin/env bash
# CI/CD step: turn a newly trained adapter into verified, benchmarked artifacts.
#
#   pipelines/deploy-adapter.sh BASE ADAPTER OUT [BASELINE_BENCH_JSON]
#
# Fails (non-zero) when the adapter does not fit the base, when any artifact is not
# equivalent to base + adapter, or when the merged model is provably slower than the base
# (or than the previous release, given its bench JSON). Every step leaves its evidence in OUT;
# a rerun into the same OUT replaces the previous run's files (--overwrite), never an input.
set -euo pipefail
base=$1 adapter=$2 out=$3 baseline=${4:-}
mkdir -p "$out"

lora-deploy inspect "$adapter" --base "$base" --json > "$out/adapter.json"
lora-deploy merge "$base" "$adapter" -o "$out/merged" --overwrite
lora-deploy export onnx "$base" -o "$out/base.onnx" --overwrite
lora-deploy export onnx "$out/merged" -o "$out/merged.onnx" --overwrite
lora-deploy verify "$base" "$adapter" --merged "$out/merged" --onnx "$out/merged.onnx" --report "$out/verify.json" --overwrite

gate=(--max-overhead 2%)
if [[ -n "$baseline" ]]; then gate+=(--baseline "$baseline" --max-regression 5%); fi
lora-deploy bench --model base="$out/base.onnx" --model merged="$out/merged.onnx" \
    --shapes 1x16,1x128,8x128 --rounds 30 --quiet \
    --json "$out/bench.json" --markdown "$out/bench.md" --plot "$out/bench.png" --overwrite "${gate[@]}"
echo "deployed: $out"
