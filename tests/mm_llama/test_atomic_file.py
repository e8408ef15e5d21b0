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
