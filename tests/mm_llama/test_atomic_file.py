"""`atomic_write`: the whole new content replaces the old, nothing is left beside it."""

from __future__ import annotations

from pathlib import Path

from mm_llama.atomic_file import atomic_write


def test_text_and_bytes_replace_the_old_file_and_leave_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "result.json"
    target.write_text("old content that is longer than the new one")
    assert atomic_write(target, "héllo\n") == target
    assert target.read_bytes() == "héllo\n".encode("utf-8")
    atomic_write(target, b"\x89PNG")
    assert target.read_bytes() == b"\x89PNG"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.json"]


def test_atomic_path_replaces_on_success_and_leaves_the_old_file_after_an_error(tmp_path: Path) -> None:
    import pytest

    from mm_llama.atomic_file import atomic_path

    target = tmp_path / "model.safetensors"
    target.write_bytes(b"old")
    with atomic_path(target) as tmp:
        assert tmp != target and not tmp.exists()
        tmp.write_bytes(b"new")
        assert target.read_bytes() == b"old"  # readers see the old file until the block ends
    assert target.read_bytes() == b"new"
    with pytest.raises(RuntimeError, match="writer failed"):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"torn")
            raise RuntimeError("writer failed")
    assert target.read_bytes() == b"new" and sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]
