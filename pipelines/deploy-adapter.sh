#!/usr/bin/env bash
# pipelines/deploy-adapter.sh BASE ADAPTER OUT: the ci-adapter-to-engine pipeline, for CI jobs that still call it.
[[ $# -eq 3 ]] || { echo "error: usage: pipelines/deploy-adapter.sh BASE ADAPTER OUT" >&2; exit 2; }
exec env BASE_MODEL="$1" ADAPTER="$2" lora-deploy run "$(dirname "$0")/ci-adapter-to-engine.yaml" --out "$3"
