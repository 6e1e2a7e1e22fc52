"""sigma_moe.fs.write_atomic, the one atomic file write: the file is complete, no temporary file
is left, and a failure names the target path."""

from __future__ import annotations

import json

import pytest

from sigma_moe.data.prepare import _write_json
from sigma_moe.fs import write_atomic
from sigma_moe.rho1.store import _write_json_atomic


def test_write_replaces_the_file_and_leaves_no_temp(tmp_path):
    p = tmp_path / "latest"
    p.write_text("step_00000001")
    text = "ünïcode " + "x" * 100_000  # larger than one write buffer
    write_atomic(p, text)
    assert p.read_text(encoding="utf-8") == text
    write_atomic(p, b"\x00\xffbytes")
    assert p.read_bytes() == b"\x00\xffbytes"
    assert sorted(q.name for q in tmp_path.iterdir()) == ["latest"]


def test_json_writers_keep_their_formats(tmp_path):
    obj = {"b": 1, "a": [1, 2]}
    _write_json(tmp_path / "x.meta.json", obj)
    _write_json_atomic(tmp_path / "meta.json", obj)
    want = json.dumps(obj, indent=2, sort_keys=True)
    assert (tmp_path / "x.meta.json").read_text() == want + "\n"
    assert (tmp_path / "meta.json").read_text() == want
    assert sorted(q.name for q in tmp_path.iterdir()) == ["meta.json", "x.meta.json"]


def test_a_failed_write_names_the_path_and_leaves_nothing(tmp_path):
    missing = tmp_path / "no-such-folder" / "meta.json"
    with pytest.raises(FileNotFoundError, match="cannot write: .*no-such-folder/meta.json'$"):
        write_atomic(missing, "{}")
    # the target is a folder: the rename fails after the temporary file was written
    (tmp_path / "taken").mkdir()
    with pytest.raises(OSError, match="cannot write: .*taken'$") as e:
        write_atomic(tmp_path / "taken", "{}")
    assert e.value.filename == str(tmp_path / "taken")
    assert sorted(q.name for q in tmp_path.iterdir()) == ["taken"]
