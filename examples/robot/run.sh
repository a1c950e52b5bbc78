#!/usr/bin/env bash
# From a LoRA-fine-tuned robot controller to a verified float16 graph in a 50 Hz loop.
# See examples/robot/README.md. Usage:
#   examples/robot/run.sh [OUT_DIR]
# Environment: KIND=policy|vla (default policy), RATE=50hz, DURATION=10s, STEPS (training
# steps of the adapter), MAX_MISSES (a deadline-miss budget: set it on the robot's own
# computer; on a shared machine other processes decide the misses).
set -euo pipefail
OUT=${1:-robot-demo}
KIND=${KIND:-policy}
DURATION=${DURATION:-10s}
RATE=${RATE:-50hz}
SPEC=lora_deploy.examples.robot:build_${KIND}
HERE=$(cd "$(dirname "$0")/../.." && pwd)
mkdir -p "$OUT/parts"

# 1. The controller (a plain nn.Module saved with torch.save) and its PEFT adapter
#    (LoRA on every linear layer), recorded observations and, for the VLA, the action
#    statistics that un-normalize its bins.
python "$HERE/models/build.py" --robot "$KIND" --out "$OUT/controller" --force ${STEPS:+--steps "$STEPS"}
SIDE=()
if [ -f "$OUT/controller/dataset_statistics.json" ]; then
  SIDE=(--side-file "$OUT/controller/dataset_statistics.json")
fi
# One observation: the static batch the robot runs at.
python - "$OUT" <<'PY'
import sys
import numpy as np
out = sys.argv[1]
with np.load(f"{out}/controller/observations.npz") as data:
    np.savez(f"{out}/obs1.npz", **{k: data[k][:1] for k in data.files})
PY

# 2. Merge: the .pt state dict is read weights-only; side files travel with the output.
lora-deploy merge "$OUT/controller/base.pt" "$OUT/controller/adapter" -o "$OUT/merged" "${SIDE[@]}" --overwrite

# 3. Export the merged controller: float16, static shapes, inputs named as forward's.
lora-deploy export onnx "$OUT/merged" -o "$OUT/policy.onnx" --module "$SPEC" \
  --inputs "$OUT/obs1.npz" --dtype float16 --static --overwrite

# 4. Verify the graph a robot will run against base + adapter unmerged in float32, at the
#    level of actions, on the 64 recorded observations (and generated ones).
lora-deploy verify "$OUT/controller/base.pt" "$OUT/controller/adapter" --module "$SPEC" \
  --merged "$OUT/merged" --onnx "$OUT/policy.onnx" --inputs "$OUT/controller/observations.npz" \
  --report "$OUT/verify.json" --overwrite

# 4b. Part by part, as robot stacks deploy such models (one graph per part, the model's own
#     code between them): export each part on the inputs it receives in the whole forward,
#     then verify each part alone and the chain of part graphs at the level of actions.
if [ "$KIND" = vla ]; then PARTS=(patch_embed llm.model llm.lm_head); else PARTS=(patch_embed blocks.0 blocks.1 action_head); fi
PART_ARGS=()
for PART in "${PARTS[@]}"; do
  lora-deploy export onnx "$OUT/merged" -o "$OUT/parts/$PART.onnx" --module "$SPEC" --part "$PART" \
    --inputs "$OUT/obs1.npz" --dtype float16 --static --overwrite
  PART_ARGS+=(--part "$PART=$OUT/parts/$PART.onnx")
done
lora-deploy verify "$OUT/controller/base.pt" "$OUT/controller/adapter" --module "$SPEC" \
  --merged "$OUT/merged" "${PART_ARGS[@]}" --inputs "$OUT/controller/observations.npz" \
  --report "$OUT/verify-parts.json" --overwrite

# 5. The control loop: one call per tick at RATE, p99 and deadline misses reported.
lora-deploy bench --model merged="$OUT/policy.onnx" --inputs "$OUT/obs1.npz" --threads 1 \
  --rate "$RATE" --duration "$DURATION" ${MAX_MISSES:+--max-misses "$MAX_MISSES"} --json "$OUT/bench.json" --overwrite

echo "done: $OUT/policy.onnx verified ($OUT/verify.json), its parts too ($OUT/verify-parts.json), and timed at $RATE ($OUT/bench.json)"
