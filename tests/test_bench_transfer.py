"""The transfer suite's task generator and table (benchmarks/transfer_tasks.py); not the suite's run."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from benchmarks import transfer_tasks as tt


def test_suite_covers_what_the_issue_asks() -> None:
    names = [t.name for t in tt.TASKS]
    assert len(set(names)) == len(names) >= 6 and set(tt.QUICK) <= set(names)
    assert {len(t.classes) for t in tt.TASKS} >= {2, 3, 10}
    assert min(t.per_class for t in tt.TASKS) <= 10 and max(t.per_class for t in tt.TASKS) >= 200
    assert min(t.size for t in tt.TASKS) == 32 and max(t.size for t in tt.TASKS) == 128
    assert {t.domain for t in tt.TASKS} == {"digits", "shapes", "textures", "scenes"}


@pytest.mark.parametrize("name", ["digits3-k10-32px", "shapes10-k12-96px", "textures2-k200-32px", "scenes5-k16-48px"])
def test_write_task_is_deterministic_and_keeps_test_apart(tmp_path, name) -> None:
    spec = next(t for t in tt.TASKS if t.name == name)
    small = tt.TaskSpec(spec.name, spec.domain, spec.classes, 3, spec.size, 2)
    train, test = tt.write_task(small, tmp_path / "a", seed=0)
    again, _ = tt.write_task(small, tmp_path / "b", seed=0)
    other, _ = tt.write_task(small, tmp_path / "a", seed=1)
    for c in small.classes:
        files = sorted((train / c).glob("*.png"))
        assert len(files) == 3 and len(list((test / c).glob("*.png"))) == 2
        img = Image.open(files[0])
        assert img.size == (small.size, small.size) and img.mode == "RGB"
        assert np.array_equal(np.asarray(img), np.asarray(Image.open(again / c / files[0].name)))
        assert not np.array_equal(np.asarray(img), np.asarray(Image.open(other / c / files[0].name)))
        assert not np.array_equal(np.asarray(img), np.asarray(Image.open(test / c / files[0].name)))


def test_digit_test_scans_never_train() -> None:
    spec = next(t for t in tt.TASKS if t.domain == "digits")
    for test, train in tt._digit_split(spec).values():
        assert len(test) == spec.test_per_class and not set(test) & set(train)


def test_t_interval_and_table() -> None:
    m, h = tt.t_interval([0.8, 0.9, 1.0])
    assert m == pytest.approx(0.9) and h == pytest.approx(4.303 * 0.1 / 3**0.5, rel=1e-3)
    assert tt.t_interval([0.5]) == (0.5, 0.0)
    rows = [
        {"task": "a", "rt_probe": 0.7, "rt_finetune": 0.8 + s / 100, "fastai": 0.75, "rt_seconds": 10.0,
         "fastai_seconds": 12.0, "unfreeze": "layer4"}
        for s in range(3)
    ]  # fmt: skip
    lines = tt.table(rows).splitlines()
    assert len(lines) == 3 and lines[0].count("|") == lines[1].count("|") == lines[2].count("|")
    cells = [c.strip() for c in lines[2].split("|")]
    assert cells[1:4] == ["a", "3", "0.700 ± 0.000"] and cells[4].startswith("0.810 ± 0.02")
    assert cells[6].startswith("0.060") and cells[7].startswith("0.110") and cells[-2] == "layer4"


def test_variants_table_pairs_by_task_and_seed() -> None:
    base = [{"task": "a", "seed": s, "label": "defaults", "rt_probe": 0.5, "rt_finetune": 0.6 + s / 10,
             "fastai": 0.4} for s in range(3)]  # fmt: skip
    var = [{"task": "a", "seed": s, "label": "v", "rt_probe": 0.5, "rt_finetune": 0.7 + s / 10, "fastai": None}
           for s in (2, 0)]  # fmt: skip
    orphan = [{"task": "b", "seed": 0, "label": "v", "rt_probe": 0.1, "rt_finetune": 0.2, "fastai": None}]
    lines = tt.variants_table(base + var + orphan).splitlines()
    assert len(lines) == 3  # task b has no defaults row: left out
    cells = [c.strip() for c in lines[2].split("|")][1:-1]
    assert cells[:3] == ["a", "3", "0.500 ± 0.000"] and cells[4].endswith("(n=2)") and cells[5].startswith("0.400")
    assert cells[6] == "0.100 ± 0.000"  # v − defaults, paired on seeds 0 and 2
    assert cells[7].startswith("0.300")  # v − probe: mean of 0.2 and 0.4


def test_table_shows_the_one_command_arm_when_measured() -> None:
    base = {"task": "a", "rt_probe": 0.7, "rt_finetune": 0.8, "fastai": 0.75, "rt_seconds": 10.0,
            "fastai_seconds": 12.0, "unfreeze": "head"}  # fmt: skip
    plain = tt.table([base, base]).splitlines()
    one = tt.table([base | {"rt1_finetune": 0.78, "rt1_seconds": 4.0}] * 2).splitlines()
    assert one[0].count("|") == plain[0].count("|") + 2 and "rt 1-command s" in one[0]
    cells = [c.strip() for c in one[2].split("|")]
    assert cells[-3] == "0.780 ± 0.000" and cells[-2] == "4.0 ± 0.0"
