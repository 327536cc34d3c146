#!/usr/bin/env bash
# compare_sources: `rt compare` picks among self-trained sources of different quality, and finetuning says
# whether it picked right. Offline, small enough for a few minutes on 2 CPUs.
#
#   recipes/compare_sources/run.sh [RUN_DIR]          (default RUN_DIR: runs/compare_sources)
#
# 1. offline_digits/make_data.py draws real handwritten digits onto crops of real photographs: source task
#    digits 0-6, target task digits 7/8/9 on other photographs (fewer drawings per scan than offline_digits).
# 2. Three sources for a ResNet-18: trained LONG_EPOCHS on the source task, the same stopped after
#    EARLY_EPOCHS, and random init (`none`).
# 3. rt compare --data target/train --test target/test --models resnet18=<long>,resnet18=<early>,resnet18=none
#    -> compare.json / compare.md / compare.png (probe accuracy with its interval, curves, LogME, cost).
# 4. The check: for each candidate, `rt fit-head` on its cached features (the compare's work folder), then
#    `rt finetune` of layer4 starting from that probe on the whole target pool, `rt evaluate` on the test
#    set; verify.py writes verify.md and says whether the recommended candidate finetunes best.
#
# Settings (environment variables): SIZE=32 SOURCE_RENDERS=2 TARGET_RENDERS=2 TEST_RENDERS=2 LONG_EPOCHS=12
#   EARLY_EPOCHS=2 KS=5,10,20,50 SEEDS=5 FT_EPOCHS=3 NICE=10 (source: batch 32, AdamW 3e-3)
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
RUN="${1:-runs/compare_sources}"
SIZE="${SIZE:-32}"
SOURCE_RENDERS="${SOURCE_RENDERS:-2}"
TARGET_RENDERS="${TARGET_RENDERS:-2}"
TEST_RENDERS="${TEST_RENDERS:-2}"
LONG_EPOCHS="${LONG_EPOCHS:-12}"
EARLY_EPOCHS="${EARLY_EPOCHS:-2}"
KS="${KS:-5,10,20,50}"
SEEDS="${SEEDS:-5}"
FT_EPOCHS="${FT_EPOCHS:-3}"
PYTHON="${PYTHON:-python}"
RT="${RT:-rt}"
NICE="${NICE:-10}" # shared machines: stay out of the way of interactive work

DATA="$RUN/data"
MODELS="$RUN/models"
LOG="$RUN/log.txt"
mkdir -p "$RUN" "$MODELS"
: >"$LOG"
START=$SECONDS
n=0
total=8

step() { # step "what" cmd args... : numbered, timed, output kept in the log (last lines shown on failure)
    local what="$1"
    shift
    n=$((n + 1))
    printf '[%2d/%d %4ds] %s ... ' "$n" "$total" "$((SECONDS - START))" "$what"
    local t0=$SECONDS
    echo "\$ $*" >>"$LOG"
    if nice -n "$NICE" "$@" >>"$LOG" 2>&1; then
        printf 'ok (%ds)\n' "$((SECONDS - t0))"
    else
        local rc=$?
        printf 'FAILED (exit %d)\n' "$rc"
        tail -n 20 "$LOG" >&2
        exit "$rc"
    fi
}

source_model() { # source_model NAME EPOCHS
    step "source $1: ResNet-18 from scratch on digits 0-6, $2 epoch(s)" \
        "$RT" finetune --data "$DATA/source/train" --model resnet18 --weights none --unfreeze all \
        --image-size "$SIZE" --epochs "$2" --batch-size 32 --lr 3e-3 --warmup-epochs 0.2 --crop-scale 0.8 \
        --no-hflip --label-smoothing 0 --patience 0 --checkpoint-every 0 --seed 0 --out "$MODELS/$1" --overwrite
}

echo "compare_sources -> $RUN (log: $LOG)"
step "make data (digits on photos, ${SIZE}px)" \
    "$PYTHON" "$HERE/../offline_digits/make_data.py" --out "$DATA" --size "$SIZE" \
    --source-renders "$SOURCE_RENDERS" --target-renders "$TARGET_RENDERS" --target-test-renders "$TEST_RENDERS"
source_model source_long "$LONG_EPOCHS"
source_model source_early "$EARLY_EPOCHS"

CANDIDATES="resnet18=$MODELS/source_long,resnet18=$MODELS/source_early,resnet18=none"
step "rt compare: 3 candidates (k = $KS, $SEEDS seeds)" \
    "$RT" compare --data "$DATA/target/train" --test "$DATA/target/test" --models "$CANDIDATES" \
    --image-size "$SIZE" --k "$KS" --seeds "$SEEDS" --out "$RUN/compare"

# the check: finetune every candidate from its probe (fitted on the compare's cached features)
IFS=',' read -r -a specs <<<"$CANDIDATES"
for spec in "${specs[@]}"; do
    name="$(basename "${spec#*=}")"
    cache="$("$PYTHON" -c 'import json,sys; r=json.load(open(sys.argv[1])); print(next(c["cache"] for c in r["candidates"] if c["spec"]==sys.argv[2]))' "$RUN/compare/compare.json" "$spec")"
    step "check $name: rt fit-head on its cache, rt finetune layer4 from that probe ($FT_EPOCHS epochs), rt evaluate" \
        bash -c "set -e
        '$RT' fit-head --cache '$cache/data.h5' --out '$MODELS/probe_$name' --overwrite
        '$RT' finetune '$MODELS/probe_$name' --data '$DATA/target/train' --unfreeze layer4 --epochs $FT_EPOCHS \
            --batch-size 32 --lr 2e-3 --no-hflip --patience 0 --checkpoint-every 0 --seed 0 \
            --out '$MODELS/finetuned_$name' --overwrite
        '$RT' evaluate '$MODELS/finetuned_$name' --data '$DATA/target/test' --out '$RUN/eval/$name'"
done

step "verify: does the recommended candidate finetune best?" "$PYTHON" "$HERE/verify.py" "$RUN"
echo
cat "$RUN/compare/compare.md"
echo
cat "$RUN/verify.md"
echo "done in $((SECONDS - START))s"
