"""`rt review`'s manifest: every change on disk at once, readable by `rt extract`, journaled, never overwriting
an outside edit, surviving kills, restarts and a second writer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from resnet_transfer.base import UsageError
from resnet_transfer.images import list_images
from resnet_transfer.tools.review import EXCLUDED, ReviewManifest

PATHS = ["cat/a.png", "cat/b.png", "dog/c.png", "dog/d.png", "loose/e.png"]
LABELS = ["cat", "cat", "dog", "dog", None]


def _images(root: Path) -> Path:
    from planted import write_images

    return write_images(root, PATHS)


def _open(root: Path, manifest: Path) -> ReviewManifest:
    return ReviewManifest(manifest, root, PATHS, LABELS)


def _listed(manifest: Path) -> dict[str, str | None]:
    """What `rt extract --data manifest` would read: path (relative to the manifest's folder) -> class."""
    il = list_images(manifest)
    return {p: (il.classes[y] if y >= 0 else None) for p, y in zip(il.paths, il.labels)}


def test_each_change_is_in_the_manifest_extract_reads_at_once(tmp_path: Path) -> None:
    root = _images(tmp_path / "images")
    manifest = root / "review.csv"
    m = _open(root, manifest)
    assert not manifest.exists()  # nothing written before the first change
    m.set(0, "dog")
    assert _listed(manifest)["cat/a.png"] == "dog"
    m.set(4, "cat")  # an unlabelled image gets a label
    m.set(3, EXCLUDED)
    listed = _listed(manifest)
    assert listed == {"cat/a.png": "dog", "cat/b.png": "cat", "dog/c.png": "dog", "loose/e.png": "cat"}
    assert m.pending == 3
    m.set(4, None)  # back to unlabelled: an empty label, still listed
    assert _listed(manifest)["loose/e.png"] is None and m.pending == 2
    m.close()


def test_paths_are_relative_to_a_manifest_elsewhere(tmp_path: Path) -> None:
    root = _images(tmp_path / "data" / "images")
    manifest = tmp_path / "data" / "fixes.csv"
    m = _open(root, manifest)
    m.set(1, "dog")
    assert _listed(manifest)["images/cat/b.png"] == "dog"
    assert m.outside == 0
    m.close()
    # a manifest beside, not above, the images: paths step out of its folder, and extract must be told
    m = _open(root, tmp_path / "other" / "fixes.csv")
    m.set(1, "dog")
    assert m.outside == len(PATHS)
    assert "../data/images/cat/b.png" in (tmp_path / "other" / "fixes.csv").read_text()
    il = list_images(tmp_path / "other" / "fixes.csv", allow_outside=True)
    assert str(root / "cat/b.png") in il.paths
    m.close()


def test_a_restart_reads_the_manifest_and_undo_reaches_back(tmp_path: Path) -> None:
    root = _images(tmp_path / "images")
    manifest = root / "review.csv"
    m = _open(root, manifest)
    m.set(0, "dog")
    m.set(2, EXCLUDED)
    m.close()
    m = _open(root, manifest)  # a new server on the same manifest
    assert m.state[0] == "dog" and m.state[2] == EXCLUDED and m.pending == 2 and m.can_undo == 2
    change = m.undo()
    assert change is not None and change.row == 2 and change.after == "dog"
    assert "dog/c.png" in _listed(manifest)
    m.undo()
    assert _listed(manifest)["cat/a.png"] == "cat" and m.pending == 0
    assert m.undo() is None
    m.close()


def test_an_outside_edit_is_reloaded_not_overwritten(tmp_path: Path) -> None:
    root = _images(tmp_path / "images")
    manifest = root / "review.csv"
    m = _open(root, manifest)
    m.set(0, "dog")
    # another program (an editor, a script) changes the manifest: b becomes dog, e is dropped, a row is added
    text = manifest.read_text().replace("cat/b.png,cat", "cat/b.png,dog").replace("loose/e.png,\n", "")
    manifest.write_text(text + "extra/f.png,fox\n")
    assert m.check_disk()
    assert m.state[1] == "dog" and m.state[4] == EXCLUDED
    m.set(2, "cat")  # the next change applies to what is on disk now
    listed = manifest.read_text()
    assert "cat/b.png,dog" in listed and "loose/e.png" not in listed and "extra/f.png,fox" in listed
    assert "cat/a.png,dog" in listed and "dog/c.png,cat" in listed
    ops = [json.loads(line)["op"] for line in m.journal_path.read_text().splitlines()]
    assert ops == ["set", "reload", "set"]
    m.close()


def test_an_outside_edit_made_while_no_server_ran_is_kept(tmp_path: Path) -> None:
    root = _images(tmp_path / "images")
    manifest = root / "review.csv"
    m = _open(root, manifest)
    m.set(0, "dog")
    m.close()
    manifest.write_text(manifest.read_text().replace("cat/a.png,dog", "cat/a.png,fox"))
    m = _open(root, manifest)
    assert m.state[0] == "fox"
    assert any("changed since the last review" in n for n in m.notes)
    assert m.can_undo == 0  # history before an outside edit is not replayed over it
    m.close()


def test_a_kill_between_journal_and_rename_is_finished_on_the_next_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from resnet_transfer.tools.review import manifest as mod

    root = _images(tmp_path / "images")
    manifest = root / "review.csv"
    m = _open(root, manifest)
    m.set(0, "dog")
    before = manifest.read_bytes()

    def killed(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt  # the process dies after the journal line, before the manifest's rename

    monkeypatch.setattr(mod, "atomic_write_text", killed)
    with pytest.raises(KeyboardInterrupt):
        m.set(1, "fox")
    assert manifest.read_bytes() == before  # never torn: the old manifest, whole
    m.close()
    monkeypatch.undo()
    m = _open(root, manifest)
    assert _listed(manifest)["cat/b.png"] == "fox" and m.state[1] == "fox"
    assert any("finished the last change" in n for n in m.notes)
    m.close()


def test_a_second_review_of_one_manifest_is_refused(tmp_path: Path) -> None:
    root = _images(tmp_path / "images")
    m = _open(root, root / "review.csv")
    with pytest.raises(UsageError, match="another `rt review`"):
        _open(root, root / "review.csv")
    m.close()
    _open(root, root / "review.csv").close()  # free again once the first one stopped


def test_a_cut_journal_line_is_ignored(tmp_path: Path) -> None:
    root = _images(tmp_path / "images")
    manifest = root / "review.csv"
    m = _open(root, manifest)
    m.set(0, "dog")
    m.close()
    with open(m.journal_path, "a") as f:
        f.write('{"seq": 9, "op": "se')  # a kill in the middle of an append
    m = _open(root, manifest)
    assert m.state[0] == "dog" and m.can_undo == 1
    m.close()


def test_a_manifest_must_be_a_csv(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=r"\.csv"):
        ReviewManifest(tmp_path / "fixes.txt", tmp_path, PATHS, LABELS)


def test_a_change_to_the_same_state_writes_nothing(tmp_path: Path) -> None:
    root = _images(tmp_path / "images")
    m = _open(root, root / "review.csv")
    m.set(0, "cat")  # already cat
    assert not (root / "review.csv").exists() and m.can_undo == 0
    m.set(0, "dog")
    m.set(0, "dog")
    assert m.can_undo == 1 and len(m.journal_path.read_text().splitlines()) == 1
    m.close()


def test_a_review_without_changes_leaves_no_file(tmp_path: Path) -> None:
    root = _images(tmp_path / "images")
    before = sorted(p.name for p in root.iterdir())
    m = _open(root, root / "review.csv")
    assert m.journal_path.exists()  # held for the lock while it runs
    m.close()
    assert sorted(p.name for p in root.iterdir()) == before
