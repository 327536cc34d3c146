"""Hugging Face datasets: a folder written by ``Dataset.save_to_disk`` (read with ``datasets.load_from_disk``,
memory-mapped Arrow) or Parquet files (``Dataset.to_parquet``, the Hub's layout; read with pyarrow, one row
group at a time, its features with ``datasets.Features``).

The image column is the one whose feature is ``datasets.Image`` (else one named ``image``/``img``/...): its
values are ``{"bytes", "path"}`` structs, raw bytes or a path (relative to the dataset's folder, else to
the working directory, as ``datasets`` records paths it did not embed). The label
column is the ``ClassLabel`` one (its names are the classes) or one named ``label``/``labels``/``cls``/...
(string values are class names; integers without a ClassLabel name their class by number). Rows are named
``<row>`` (``save_to_disk``) or ``<file>/<row>`` (Parquet), zero-padded to 8 digits.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

from ..base import DataError
from .reader import Reader, Stat, file_stamp, require

IMAGE_COLUMNS = ("image", "img", "jpg", "jpeg", "png", "webp", "picture")
LABEL_COLUMNS = ("label", "labels", "cls", "class", "target", "fine_label")
KEEP_GROUPS = 4  # Parquet row groups (image column only) kept decoded for the decode threads


def _libs() -> Any:
    require("pyarrow", "hf", "reading Hugging Face datasets and Parquet files")
    return require("datasets", "hf", "reading Hugging Face datasets and Parquet files")


def columns(features: Any, names: list[str], where: str) -> tuple[str, str | None]:
    """The image column and the label column (None: unlabelled) of a dataset with ``features``."""
    datasets = _libs()
    feats = dict(features or {})
    image = [c for c, f in feats.items() if isinstance(f, datasets.Image)]
    image = image or [c for c in names if c.lower() in IMAGE_COLUMNS]
    if not image:
        raise DataError(
            f"{where}: no image column among {', '.join(names)}",
            "cast the image column to datasets.Image() (or name it 'image') before saving",
        )
    label = [c for c, f in feats.items() if isinstance(f, datasets.ClassLabel)]
    label = label or [c for c in names if c.lower() in LABEL_COLUMNS]
    return image[0], (label[0] if label else None)


def class_names(values: list[Any], feature: Any) -> list[str | None]:
    """Label values as class names (ClassLabel ints through its names; -1 and None unlabelled)."""
    datasets = _libs()
    out: list[str | None] = []
    for v in values:
        if v is None or (isinstance(v, int) and v < 0):
            out.append(None)
        elif isinstance(feature, datasets.ClassLabel) and isinstance(v, int):
            out.append(feature.int2str(v))
        else:
            out.append(str(v))
    return out


def image_bytes(value: Any, base: Path, where: str) -> bytes:
    """The encoded image of one cell: a ``{"bytes", "path"}`` struct, bytes, or a path."""
    if isinstance(value, dict):
        if value.get("bytes"):
            return bytes(value["bytes"])
        value = value.get("path")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, str) and value:
        p = Path(value)
        if not p.is_absolute() and (base / p).exists():
            p = base / p  # relative to the dataset's folder, else (as datasets writes them) to the working one
        return p.read_bytes()
    raise OSError(f"{where}: the image cell is empty")


class HfReader(Reader):
    """A ``save_to_disk`` folder (one split)."""

    kind = "hf"

    def __init__(self, root: Path, ds: Any) -> None:
        super().__init__(root)
        self.ds = ds
        self.image, self.label = columns(ds.features, list(ds.column_names), str(root))
        self.cells = ds.data.table.column(self.image)
        stamp = root / "state.json"
        self.stamp = file_stamp(stamp if stamp.exists() else root)

    @classmethod
    def reopen(cls, root: str) -> HfReader:
        return cls.open(Path(root))

    @classmethod
    def open(cls, root: Path) -> HfReader:
        datasets = _libs()
        root = Path(root).expanduser()
        if (root / "dataset_dict.json").is_file():
            splits = sorted(p.name for p in root.iterdir() if (p / "state.json").is_file())
            raise DataError(
                f"--data {root}: a DatasetDict with splits {', '.join(splits)}",
                f"name one split, e.g. --data {root / (splits[0] if splits else 'train')}",
            )
        try:
            ds = datasets.load_from_disk(str(root))
        except (OSError, ValueError) as exc:
            raise DataError(
                f"--data {root}: not a readable saved dataset ({exc})", "save it with save_to_disk"
            ) from None
        return cls(root, ds)

    def listing(self) -> tuple[list[str], list[str | None], list[str]]:
        n = self.ds.num_rows
        names = [f"{i:08d}" for i in range(n)]
        if self.label is None:
            return names, [None] * n, []
        values = self.ds.data.table.column(self.label).to_pylist()
        return names, class_names(values, self.ds.features[self.label]), []

    def _row(self, name: str) -> int:
        row = int(name)
        if not 0 <= row < len(self.cells):
            raise KeyError(name)
        return row

    def read(self, name: str) -> bytes:
        return image_bytes(self.cells[self._row(name)].as_py(), self.root, f"{self.root} row {name}")

    def stat(self, name: str) -> Stat:
        return self._row(name), *self.stamp

    def has(self, name: str) -> bool:
        try:
            self._row(name)
            return True
        except (KeyError, ValueError):
            return False


class ParquetReader(Reader):
    """Parquet files (one, or every ``*.parquet`` directly in a folder); rows ``<file>/<row>``."""

    kind = "parquet"

    def __init__(self, root: Path, files: list[Path] | None = None) -> None:
        super().__init__(root)
        _libs()
        self.files = files
        self._meta: dict[str, tuple[Any, str, str | None, list[int], tuple[int, int]]] = {}
        self._groups: OrderedDict[tuple[str, int], Any] = OrderedDict()
        self._lock = threading.Lock()

    @classmethod
    def reopen(cls, root: str) -> ParquetReader:
        return cls.open(Path(root))

    @classmethod
    def open(cls, path: Path) -> ParquetReader:
        p = Path(path).expanduser()
        if p.is_file():
            return cls(p.resolve().parent, [p.resolve()])
        return cls(p)

    def file_list(self) -> list[Path]:
        if self.files is None:
            self.files = sorted(q for q in self.root.iterdir() if q.is_file() and q.suffix.lower() == ".parquet")
        return self.files

    def _file(self, rel: str) -> tuple[Any, str, str | None, list[int], tuple[int, int]]:
        """``(ParquetFile, image column, label column, first row of each row group, stamp)`` of one file."""
        if rel not in self._meta:
            import pyarrow.parquet as pq

            datasets = _libs()
            path = self.root / rel
            try:
                pf = pq.ParquetFile(path)
            except (OSError, ValueError) as exc:
                raise DataError(f"{path}: not a readable Parquet file ({exc})", "check the file") from None
            features = datasets.Features.from_arrow_schema(pf.schema_arrow)
            image, label = columns(features, list(pf.schema_arrow.names), str(path))
            starts, total = [], 0
            for g in range(pf.num_row_groups):
                starts.append(total)
                total += pf.metadata.row_group(g).num_rows
            starts.append(total)
            self._meta[rel] = (pf, image, label, starts, file_stamp(path))
        return self._meta[rel]

    def listing(self) -> tuple[list[str], list[str | None], list[str]]:
        datasets = _libs()
        names: list[str] = []
        labels: list[str | None] = []
        for f in self.file_list():
            rel = f.relative_to(self.root).as_posix()
            pf, _image, label, starts, _ = self._file(rel)
            n = starts[-1]
            names += [f"{rel}/{i:08d}" for i in range(n)]
            if label is None:
                labels += [None] * n
                continue
            feature = datasets.Features.from_arrow_schema(pf.schema_arrow).get(label)
            with self._lock:
                values = pf.read(columns=[label]).column(0).to_pylist()
            labels += class_names(values, feature)
        return names, labels, []

    def split(self, name: str) -> tuple[str, int]:
        rel, _, row = name.rpartition("/")
        if not rel or not row.isdigit():
            raise KeyError(name)
        return rel, int(row)

    def read(self, name: str) -> bytes:
        import bisect

        rel, row = self.split(name)
        pf, image, _, starts, _ = self._file(rel)
        if not 0 <= row < starts[-1]:
            raise KeyError(name)
        g = bisect.bisect_right(starts, row) - 1
        with self._lock:  # a ParquetFile is one file position: one reader at a time, and a row group read once
            cells = self._groups.get((rel, g))
            if cells is None:
                cells = pf.read_row_group(g, columns=[image]).column(0)
                self._groups[(rel, g)] = cells
                while len(self._groups) > KEEP_GROUPS:
                    self._groups.popitem(last=False)
            else:
                self._groups.move_to_end((rel, g))
        return image_bytes(cells[row - starts[g]].as_py(), (self.root / rel).parent, f"{self.root / rel} row {row}")

    def stat(self, name: str) -> Stat:
        rel, row = self.split(name)
        return row, *self._file(rel)[4]

    def has(self, name: str) -> bool:
        try:
            rel, row = self.split(name)
            return (self.root / rel).is_file() and row < self._file(rel)[3][-1]
        except (KeyError, DataError):
            return False
