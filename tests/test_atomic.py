"""Atomic writes: all or nothing, with ordinary file permissions."""

import os
import stat

import pytest

from backdoor_engine.atomic import atomic_write, write_json_atomic
from backdoor_engine.errors import InputError


def test_failure_leaves_the_old_file_and_no_temp_file(tmp_path):
    target = tmp_path / "out.json"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_write(target, "w") as f:
            f.write("half")
            raise RuntimeError("boom")
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["out.json"]


def test_result_has_the_permissions_of_a_plain_open(tmp_path):
    write_json_atomic(tmp_path / "a.json", {"k": 1})
    (tmp_path / "b.json").write_text("{}")
    mode = stat.S_IMODE((tmp_path / "a.json").stat().st_mode)
    assert mode == stat.S_IMODE((tmp_path / "b.json").stat().st_mode)


def test_missing_directory_is_named(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        write_json_atomic(tmp_path / "nope" / "a.json", {})
