"""Turn the Oxford-IIIT Pets annotation lists into rt manifests (CSV ``path,label``).

    python recipes/pets/make_manifests.py PETS_DIR

PETS_DIR holds the two official archives unpacked: ``images/*.jpg`` and ``annotations/trainval.txt``,
``annotations/test.txt`` (lines ``Abyssinian_100 1 1 1``: image name, class id 1-37, species, breed id).
Writes ``PETS_DIR/trainval.csv`` and ``PETS_DIR/test.csv`` with the breed name (the image name without its
trailing ``_NNN``) as the label; rows whose image is missing are left out and counted.
"""

from __future__ import annotations

import sys
from pathlib import Path


def convert(root: Path, split: str) -> tuple[Path, int, int]:
    """Write ``root/<split>.csv`` from ``root/annotations/<split>.txt``; returns (path, rows, missing)."""
    rows, missing = [], 0
    for line in (root / "annotations" / f"{split}.txt").read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        name = line.split()[0]
        if not (root / "images" / f"{name}.jpg").exists():
            missing += 1
            continue
        rows.append(f"images/{name}.jpg,{name.rsplit('_', 1)[0]}")
    out = root / f"{split}.csv"
    out.write_text("path,label\n" + "\n".join(rows) + "\n")
    return out, len(rows), missing


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    root = Path(args[0])
    for split in ("trainval", "test"):
        out, n, missing = convert(root, split)
        print(f"{out}: {n} images" + (f" ({missing} listed but missing)" if missing else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
