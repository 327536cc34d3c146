#!/usr/bin/env bash
# offline_digits: transfer learning measured end to end, offline, with rt commands only.
#
#   recipes/offline_digits/run.sh [RUN_DIR]          (default RUN_DIR: runs/offline_digits)
#
# 1. make_data.py draws real handwritten digits (scikit-learn) onto crops of real photographs (scikit-learn,
#    scikit-image): source task = digits 0-6, target task = digits 7/8/9 with k = 5, 10, 20, all per class.
# 2. A source ResNet-18 is trained from scratch on the source task (rt finetune --weights none --unfreeze all).
# 3. On the target task, for each k: a linear probe on the source model's features and on random-init
#    features (rt extract + rt fit-head), training from scratch, and finetuning layer4 / all of the source
#    model starting from its probe (rt finetune). Every model is scored on the same test set (rt evaluate).
# 4. results.py reads the rt evaluate reports and writes RUN_DIR/results.md and RUN_DIR/accuracy_vs_k.png.
#
# Settings (environment variables; the defaults are the README's run):
#   SIZE=32 SOURCE_RENDERS=3 SOURCE_EPOCHS=15 KS="k5 k10 k20 all" METHODS="probe scratch finetune"
#   TARGET_EPOCHS="k5:60 k10:40 k20:30 all:15" (epochs per k: small sets get more passes, not more images)
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
RUN="${1:-runs/offline_digits}"
SIZE="${SIZE:-32}"
SOURCE_RENDERS="${SOURCE_RENDERS:-3}"
SOURCE_EPOCHS="${SOURCE_EPOCHS:-15}"
KS="${KS:-k5 k10 k20 all}"
METHODS="${METHODS:-probe scratch finetune}"
TARGET_EPOCHS="${TARGET_EPOCHS:-k5:60 k10:40 k20:30 all:15}"
PYTHON="${PYTHON:-python}"
RT="${RT:-rt}"

DATA="$RUN/data"
MODELS="$RUN/models"
CACHE="$RUN/cache"
EVAL="$RUN/eval"
LOG="$RUN/log.txt"
mkdir -p "$RUN"
: >"$LOG"

epochs_for() { # epochs_for K -> the TARGET_EPOCHS entry for K
    local kv
    for kv in $TARGET_EPOCHS; do [ "${kv%%:*}" = "$1" ] && { echo "${kv#*:}"; return; }; done
    echo 20
}

n_ks=$(wc -w <<<"$KS")
total=2 # make_data, source model
case " $METHODS " in *" probe "*) total=$((total + 2 + 2 * 3 * n_ks)) ;; esac
case " $METHODS " in *" scratch "*) total=$((total + 2 * n_ks)) ;; esac
case " $METHODS " in *" finetune "*) total=$((total + 4 * n_ks)) ;; esac
total=$((total + 1)) # results
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

acc_of() { "$PYTHON" -c 'import json, sys; print("%.3f" % json.load(open(sys.argv[1]))["accuracy"])' "$1"; }

echo "offline_digits -> $RUN (log: $LOG)"
step "make data (digits on photos, ${SIZE}px)" \
    "$PYTHON" "$HERE/make_data.py" --out "$DATA" --size "$SIZE" --source-renders "$SOURCE_RENDERS"

step "source model: ResNet-18 from scratch on digits 0-6 ($SOURCE_EPOCHS epochs)" \
    "$RT" finetune --data "$DATA/source/train" --model resnet18 --weights none --unfreeze all \
    --image-size "$SIZE" --epochs "$SOURCE_EPOCHS" --batch-size 64 --lr 3e-3 --crop-scale 0.6 --no-hflip --out "$MODELS/source" --overwrite

if [[ " $METHODS " == *" probe "* ]]; then
    for bb in source random; do
        if [ "$bb" = source ]; then w="$MODELS/source"; else w=none; fi
        step "features of the target test set ($bb backbone)" \
            "$RT" extract --data "$DATA/target/test" --model resnet18 --weights "$w" --image-size "$SIZE" \
            --out "$CACHE/$bb/test.h5" --overwrite
        for k in $KS; do
            step "probe on $bb features, $k: extract" \
                "$RT" extract --data "$DATA/target/train_$k" --model resnet18 --weights "$w" \
                --image-size "$SIZE" --out "$CACHE/$bb/$k.h5" --overwrite
            step "probe on $bb features, $k: fit-head" \
                "$RT" fit-head --cache "$CACHE/$bb/$k.h5" --out "$MODELS/probe_$bb/$k" --overwrite
            step "probe on $bb features, $k: evaluate" \
                "$RT" evaluate "$MODELS/probe_$bb/$k" --cache "$CACHE/$bb/test.h5" --out "$EVAL/probe_$bb/$k"
            echo "        test accuracy $(acc_of "$EVAL/probe_$bb/$k/report.json")"
        done
    done
fi

if [[ " $METHODS " == *" scratch "* ]]; then
    for k in $KS; do
        e=$(epochs_for "$k")
        step "from scratch, $k ($e epochs)" \
            "$RT" finetune --data "$DATA/target/train_$k" --model resnet18 --weights none --unfreeze all \
            --image-size "$SIZE" --epochs "$e" --patience 0 --crop-scale 0.6 --no-hflip --color-jitter 0.4 --out "$MODELS/scratch/$k" --overwrite
        step "from scratch, $k: evaluate" \
            "$RT" evaluate "$MODELS/scratch/$k" --data "$DATA/target/test" --out "$EVAL/scratch/$k"
        echo "        test accuracy $(acc_of "$EVAL/scratch/$k/report.json")"
    done
fi

if [[ " $METHODS " == *" finetune "* ]]; then
    for depth in layer4 all; do
        for k in $KS; do
            e=$(epochs_for "$k")
            # starts from the source-feature probe of the same k (rt fit-head's head directory)
            step "finetune $depth from the source model, $k ($e epochs)" \
                "$RT" finetune "$MODELS/probe_source/$k" --data "$DATA/target/train_$k" --unfreeze "$depth" \
                --epochs "$e" --patience 0 --crop-scale 0.6 --no-hflip --color-jitter 0.4 --out "$MODELS/finetune_$depth/$k" --overwrite
            step "finetune $depth, $k: evaluate" \
                "$RT" evaluate "$MODELS/finetune_$depth/$k" --data "$DATA/target/test" --out "$EVAL/finetune_$depth/$k"
            echo "        test accuracy $(acc_of "$EVAL/finetune_$depth/$k/report.json")"
        done
    done
fi

step "results table and plot" "$PYTHON" "$HERE/results.py" "$RUN"
echo
cat "$RUN/results.md"
echo
echo "done in $((SECONDS - START))s"
echo "  table:  $RUN/results.md"
echo "  plot:   $RUN/accuracy_vs_k.png"
echo "  models: $MODELS/ (source = the source-pretrained backbone: use it as --weights $MODELS/source)"
echo "  log:    $LOG"
