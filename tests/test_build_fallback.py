"""setup.py without a working toolchain: the install goes on as pure Python, with a warning."""

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EXTENSION_FILE = "backdoor_engine/_C" + sysconfig.get_config_var("EXT_SUFFIX")


@pytest.fixture
def source_tree(tmp_path):
    """A copy of what setup.py builds from, so a failed build cannot touch this checkout's extension."""
    tree = tmp_path / "src"
    tree.mkdir()
    for name in ("setup.py", "pyproject.toml", "README.md", "CMakeLists.txt"):
        if (REPO / name).exists():
            shutil.copy(REPO / name, tree / name)
    shutil.copytree(REPO / "csrc", tree / "csrc")
    return tree


@pytest.mark.parametrize(
    "env_changes,reason",
    [({"PATH": "/nonexistent"}, "cmake not found on PATH"), ({"CXX": "/bin/false"}, "exited 1")],
    ids=["no cmake", "broken compiler"],
)
def test_failed_extension_build_warns_and_leaves_no_binary(source_tree, env_changes, reason):
    # Binaries from earlier builds, in the build tree and (editable installs) in the source tree.
    stale_binaries = [source_tree / "build_lib" / EXTENSION_FILE, source_tree / EXTENSION_FILE]
    for binary in stale_binaries:
        binary.parent.mkdir(parents=True, exist_ok=True)
        binary.write_bytes(b"left by an earlier build")
    command = [sys.executable, "setup.py", "build_ext", "--build-lib", "build_lib", "--build-temp", "build_temp"]
    result = subprocess.run(command, cwd=source_tree, env={**os.environ, **env_changes}, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "building the compiled extension backdoor_engine._C failed" in result.stderr
    assert reason in result.stderr
    for binary in stale_binaries:
        assert not binary.exists(), f"{binary.name} would be loaded as if built from these sources"
