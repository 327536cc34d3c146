#!/usr/bin/env bash
# cat_detector: the small-dataset workflow with rt commands only.
#
#   recipes/cat_detector/run.sh TRAIN_DIR TEST_DIR [RUN_DIR]       (default RUN_DIR: runs/cat_detector)
#
# TRAIN_DIR and TEST_DIR are image folders with one sub-folder per class (e.g. cat/ dog/ other/), a few dozen
# images per class. Steps: extract (frozen backbone, once) -> fit-head (seconds) -> evaluate; with
# FINETUNE=1 (worth it once you have ~50+ images per class): finetune layer4 starting from that head ->
# evaluate.
#
# Settings (environment variables):
#   MODEL=resnet50  WEIGHTS=imagenet   ImageNet weights: needs the hub (huggingface.co) or its local cache.
#   Offline: WEIGHTS=PATH (a .pth/.safetensors state dict, or a model directory `rt finetune` wrote, e.g.
#   MODEL=resnet18 WEIGHTS=runs/offline_digits/models/source) or WEIGHTS=none (random init: a baseline only).
#   IMAGE_SIZE (default: the backbone's own; 64 suits the offline_digits source model), FINETUNE=0|1,
#   EPOCHS=10 (finetune).
set -euo pipefail

if [ $# -lt 2 ]; then
    sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
fi
TRAIN="$1"
TEST="$2"
RUN="${3:-runs/cat_detector}"
MODEL="${MODEL:-resnet50}"
WEIGHTS="${WEIGHTS:-imagenet}"
FINETUNE="${FINETUNE:-0}"
EPOCHS="${EPOCHS:-10}"
RT="${RT:-rt}"
SIZE_OPT=()
[ -n "${IMAGE_SIZE:-}" ] && SIZE_OPT=(--image-size "$IMAGE_SIZE")

mkdir -p "$RUN"
set -x
"$RT" extract --data "$TRAIN" --model "$MODEL" --weights "$WEIGHTS" "${SIZE_OPT[@]}" --out "$RUN/train.h5"
"$RT" extract --data "$TEST" --model "$MODEL" --weights "$WEIGHTS" "${SIZE_OPT[@]}" --out "$RUN/test.h5"
"$RT" fit-head --cache "$RUN/train.h5" --out "$RUN/head" --overwrite
"$RT" evaluate "$RUN/head" --cache "$RUN/test.h5" --out "$RUN/eval_head"
if [ "$FINETUNE" = 1 ]; then
    "$RT" finetune "$RUN/head" --data "$TRAIN" --unfreeze layer4 --epochs "$EPOCHS" --out "$RUN/finetuned" --overwrite
    "$RT" evaluate "$RUN/finetuned" --data "$TEST" --out "$RUN/eval_finetuned"
fi
set +x
echo
echo "head:            $RUN/head (rt predict $RUN/head NEW_IMAGES...: image files, folders or a CSV manifest)"
echo "head accuracy:   $RUN/eval_head/report.json"
[ "$FINETUNE" = 1 ] && echo "finetuned:       $RUN/finetuned, accuracy in $RUN/eval_finetuned/report.json"
exit 0
