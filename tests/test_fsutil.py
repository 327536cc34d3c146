"""fsutil: a write is whole or absent; a failure leaves the previous file and no temporary behind."""

from __future__ import annotations

import errno
import json

import pytest

from resnet_transfer.base import DiskFullError, atomic_path, atomic_write_json, atomic_write_text, file_digest


def test_atomic_write_replaces_whole(tmp_path):
    p = tmp_path / "report.json"
    atomic_write_json(p, {"a": 1})
    atomic_write_json(p, {"a": 2, "b": [1, 2]})
    assert json.loads(p.read_text()) == {"a": 2, "b": [1, 2]}
    assert sorted(x.name for x in tmp_path.iterdir()) == ["report.json"]


def test_failure_keeps_previous_file_and_no_temp(tmp_path):
    p = tmp_path / "x.txt"
    atomic_write_text(p, "old")
    with pytest.raises(RuntimeError, match="boom"), atomic_path(p) as tmp:
        tmp.write_text("half")
        raise RuntimeError("boom")
    assert p.read_text() == "old"
    assert sorted(x.name for x in tmp_path.iterdir()) == ["x.txt"]


def test_disk_full_is_reported_as_such(tmp_path):
    p = tmp_path / "x.bin"
    with pytest.raises(DiskFullError, match="disk full while writing"), atomic_path(p) as tmp:
        tmp.write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")
    assert not p.exists()
    assert list(tmp_path.iterdir()) == []


def test_file_digest_follows_content_not_path(tmp_path):
    a, b, c = tmp_path / "a.png", tmp_path / "sub" / "b.png", tmp_path / "c.png"
    b.parent.mkdir()
    a.write_bytes(b"\x89PNG same bytes" * 1000)
    b.write_bytes(a.read_bytes())
    c.write_bytes(a.read_bytes()[:-1] + b"!")
    assert file_digest(a) == file_digest(b)
    assert file_digest(a) != file_digest(c)
    assert len(file_digest(a)) == 32
