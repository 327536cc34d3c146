#!/usr/bin/env bash
# Whole-process wall time of each `rt` command on a tiny input (median of RUNS runs, default 3).
#
#   tools/startup_times.sh [RUNS]        run from the repository root; prints a Markdown table
#
# The input: 3 classes x 4 small images, ResNet-18 with --weights none at --image-size 32, so the figures
# are dominated by start-up (imports), not by work. RT (default: `python -m resnet_transfer`) picks the CLI.
set -euo pipefail
RUNS="${1:-3}"
RT="${RT:-python -m resnet_transfer}"
W="$(mktemp -d)"
trap 'rm -rf "$W"' EXIT
python - "$W" <<'PY'
import sys
from pathlib import Path
sys.path.insert(0, ".")
from tests.conftest import make_image_folder
make_image_folder(Path(sys.argv[1]) / "data", per_class=4, seed=0)
PY
ONE="$(find "$W/data/circle" -name '*.png' | head -1)"
$RT -q extract --data "$W/data" --model resnet18 --weights none --image-size 32 --out "$W/tiny.h5"
$RT -q fit-head --cache "$W/tiny.h5" --out "$W/head" >/dev/null

median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
timeit() {  # label, command...
  local label="$1"; shift
  local samples=()
  for _ in $(seq "$RUNS"); do
    local t
    /usr/bin/time -f %e -o "$W/t" "$@" >/dev/null 2>&1 || true  # error commands exit 2 on purpose
    samples+=("$(tail -1 "$W/t")")
  done
  printf '| `%s` | %s | %s |\n' "$label" "$(printf '%s\n' "${samples[@]}" | median)" "${samples[*]}"
}
echo "| command | median s | samples s |"
echo "|---|---:|---|"
timeit "rt --help" $RT --help
timeit "rt --version" $RT --version
timeit "rt info CACHE" $RT info "$W/tiny.h5"
timeit "rt info HEAD_DIR" $RT info "$W/head"
timeit "rt extract --data /missing (error)" $RT extract --data "$W/missing" --out "$W/x.h5"
timeit "rt extract (12 images, r18 @32)" $RT extract --data "$W/data" --model resnet18 --weights none --image-size 32 --out "$W/x.h5" --overwrite
timeit "rt fit-head (12 rows)" $RT fit-head --cache "$W/tiny.h5" --out "$W/h2" --overwrite
timeit "rt predict HEAD one.png" $RT predict "$W/head" "$ONE"
timeit "rt evaluate HEAD --cache" $RT evaluate "$W/head" --cache "$W/tiny.h5"
timeit "rt evaluate HEAD --data" $RT evaluate "$W/head" --data "$W/data"
timeit "rt finetune HEAD --epochs 1" $RT finetune "$W/head" --data "$W/data" --unfreeze layer4 --epochs 1 --out "$W/ft" --overwrite
timeit "rt export HEAD --format torchscript" $RT export "$W/head" --format torchscript --out "$W/m.pt"
