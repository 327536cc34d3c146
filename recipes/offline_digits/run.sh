#!/usr/bin/env bash
# offline_digits: transfer learning measured end to end, offline, with intervals over seeds.
#
#   recipes/offline_digits/run.sh [RUN_DIR]          (default RUN_DIR: runs/offline_digits)
#
# 1. make_data.py draws real handwritten digits (scikit-learn) onto crops of real photographs (scikit-learn,
#    scikit-image): source task = digits 0-6; target task = digits 7/8/9 (other scans, other photographs).
# 2. A source ResNet-18 is trained from scratch on the source task (rt finetune --weights none --unfreeze all).
# 3. The target's training pool and test set are extracted once with the source backbone and once with a
#    random-init one (rt extract; the two branches run side by side); label-efficiency curves of the linear probe (and kNN) come from those
#    caches alone, k images per class, SEEDS draws of the k images each (rt curve).
# 4. sweep.py trains the networks: from scratch at every k, finetune layer4 / all of the source model at the
#    largest k, FT_SEEDS seeds each (one rt finetune + rt evaluate per run, in one process).
# 5. results.py writes RUN_DIR/results.md (mean and 95% interval per k), results.json and accuracy_vs_k.png.
#
# Settings (environment variables; the defaults are the README's run):
#   SIZE=32 SOURCE_RENDERS=8 SOURCE_EPOCHS=7 TARGET_RENDERS=4 TEST_RENDERS=3 CURVE_KS=5,10,20,50 BIG_K=200
#   SEEDS=10 FT_SEEDS=3 SCRATCH_KS=10,200 METHODS="probe sweep" SWEEP=scratch,layer4,all
#   SOURCE_MODEL=DIR: reuse the source model of an earlier run with the same data settings (skips step 2)
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
RUN="${1:-runs/offline_digits}"
SIZE="${SIZE:-32}"
SOURCE_RENDERS="${SOURCE_RENDERS:-8}"
SOURCE_EPOCHS="${SOURCE_EPOCHS:-7}"
TARGET_RENDERS="${TARGET_RENDERS:-4}"
TEST_RENDERS="${TEST_RENDERS:-3}"
MAX_SCANS="${MAX_SCANS:-}"
BIG_K="${BIG_K:-200}"
CURVE_KS="${CURVE_KS:-5,10,20,50},$BIG_K"
SEEDS="${SEEDS:-10}"
FT_SEEDS="${FT_SEEDS:-3}"
SCRATCH_KS="${SCRATCH_KS:-10,$BIG_K}"
METHODS="${METHODS:-probe sweep}"
SWEEP="${SWEEP:-scratch,layer4,all}"
PYTHON="${PYTHON:-python}"
RT="${RT:-rt}"

DATA="$RUN/data"
MODELS="$RUN/models"
CACHE="$RUN/cache"
LOG="$RUN/log.txt"
mkdir -p "$RUN"
: >"$LOG"

total=3 # make_data, source model, results
case " $METHODS " in *" probe "*) total=$((total + 6)) ;; esac
case " $METHODS " in *" sweep "*) total=$((total + 1)) ;; esac
n=0
START=$SECONDS

step() { # step "what" cmd args... : numbered, timed, output kept in the log (last lines shown on failure)
    local what="$1"
    shift
    n=$((n + 1))
    printf '[%2d/%d %4ds] %s ... ' "$n" "$total" "$((SECONDS - START))" "$what"
    local t0=$SECONDS
    echo "\$ $*" >>"$LOG"
    if "$@" >>"$LOG" 2>&1; then
        printf 'ok (%ds)\n' "$((SECONDS - t0))"
    else
        local rc=$?
        printf 'FAILED (exit %d)\n' "$rc"
        tail -n 20 "$LOG" >&2
        echo "full log: $LOG" >&2
        exit "$rc"
    fi
}

echo "offline_digits -> $RUN (log: $LOG)"
step "make data (digits on photos, ${SIZE}px)" \
    "$PYTHON" "$HERE/make_data.py" --out "$DATA" --size "$SIZE" --source-renders "$SOURCE_RENDERS" \
    --target-renders "$TARGET_RENDERS" --target-test-renders "$TEST_RENDERS" ${MAX_SCANS:+--max-train-scans "$MAX_SCANS"}

if [ -n "${SOURCE_MODEL:-}" ]; then # reuse a source model from an earlier run (its data must be the same)
    mkdir -p "$MODELS"
    rm -rf "$MODELS/source" && cp -r "$SOURCE_MODEL" "$MODELS/source" && rm -rf "$MODELS/source/checkpoints"
    n=$((n + 1))
    echo "[ $n/$total] source model: copied from $SOURCE_MODEL"
else
    step "source model: ResNet-18 from scratch on digits 0-6 ($SOURCE_EPOCHS epochs)" \
        "$RT" finetune --data "$DATA/source/train" --model resnet18 --weights none --unfreeze all \
        --image-size "$SIZE" --epochs "$SOURCE_EPOCHS" --batch-size 128 --lr 4e-3 --warmup-epochs 0.5 \
        --crop-scale 0.6 --no-hflip --label-smoothing 0 --precision auto --patience 0 --checkpoint-every 0 \
        --out "$MODELS/source" --overwrite
fi

probe_branch() { # probe_branch source|random: the target pool and test set through one backbone, then the curves
    local bb="$1" w=none
    if [ "$bb" = source ]; then w="$MODELS/source"; fi
    for part in train test; do
        step "features of the target $part set ($bb backbone)" \
            "$RT" extract --data "$DATA/target/$part" --model resnet18 --weights "$w" --image-size "$SIZE" \
            --out "$CACHE/$bb/$part.h5" --overwrite
    done
    step "probe + kNN curves on $bb features (k = $CURVE_KS, $SEEDS seeds)" \
        "$RT" curve --train "$CACHE/$bb/train.h5" --test "$CACHE/$bb/test.h5" --k "$CURVE_KS" --seeds "$SEEDS" \
        --out "$RUN/curves/$bb"
}

if [[ " $METHODS " == *" probe "* ]]; then
    # The two branches are independent, and each of their five processes spends most of its few seconds
    # importing torch on one core: run them side by side (the random one logs apart, then is appended).
    (
        n=$((n + 3))
        LOG="$RUN/log.random.txt"
        : >"$LOG"
        probe_branch random
    ) >"$RUN/steps.random.txt" 2>&1 &
    random_pid=$!
    probe_branch source
    random_rc=0
    wait "$random_pid" || random_rc=$?
    cat "$RUN/steps.random.txt"
    cat "$RUN/log.random.txt" >>"$LOG"
    [ "$random_rc" -eq 0 ] || exit "$random_rc" # (its own log stays, as its message says)
    rm -f "$RUN/steps.random.txt" "$RUN/log.random.txt"
    n=$((n + 3))
fi

if [[ " $METHODS " == *" sweep "* ]]; then
    step "networks: $SWEEP (scratch k = $SCRATCH_KS; finetune k = $BIG_K; $FT_SEEDS seeds)" \
        "$PYTHON" "$HERE/sweep.py" "$RUN" --methods "$SWEEP" --scratch-ks "$SCRATCH_KS" --finetune-ks "$BIG_K" \
        --seeds "$FT_SEEDS" --size "$SIZE"
fi

step "results table and plot" "$PYTHON" "$HERE/results.py" "$RUN"
echo
cat "$RUN/results.md"
echo
echo "done in $((SECONDS - START))s"
echo "  table:  $RUN/results.md (numbers: $RUN/results.json)"
echo "  plot:   $RUN/accuracy_vs_k.png"
echo "  models: $MODELS/ (source = the source-pretrained backbone: use it as --weights $MODELS/source)"
echo "  log:    $LOG"
