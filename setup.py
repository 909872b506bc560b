"""Builds the optional compiled extension backdoor_engine._C through CMake.

Metadata lives in pyproject.toml. When the extension cannot be built (no compiler, no CMake,
no pybind11), the package still installs as pure Python and uses the PyTorch kernels.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

SOURCE_DIR = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    """An extension whose sources are built by the CMakeLists.txt at the repository root."""

    def __init__(self, name: str):
        super().__init__(name, sources=[])


class ExtensionBuildError(Exception):
    pass


class OptionalCMakeBuild(build_ext):
    """Builds each CMakeExtension; one that fails is dropped with a warning, not a failed install."""

    def build_extensions(self):
        built = []
        for extension in self.extensions:
            try:
                self._build_with_cmake(extension)
            except ExtensionBuildError as error:
                # A binary left by an earlier build (in the build tree, or in the source tree from an
                # editable install) would be loaded as if it matched these sources, and a cached
                # failed configuration (say, a missing compiler) would fail the next try.
                Path(self.get_ext_fullpath(extension.name)).unlink(missing_ok=True)
                (SOURCE_DIR / self.get_ext_filename(extension.name)).unlink(missing_ok=True)
                shutil.rmtree(self._cmake_build_dir(), ignore_errors=True)
                print(
                    f"WARNING: backdoor-engine: building the compiled extension {extension.name} failed; "
                    f"installing pure Python, which uses the slower PyTorch kernels.\nReason: {error}",
                    file=sys.stderr,
                )
            else:
                built.append(extension)
        # Later steps (copy into the source tree for editable installs, wheel contents) only see these.
        self.extensions = built

    def _build_with_cmake(self, extension: CMakeExtension):
        cmake = shutil.which("cmake")
        if cmake is None:
            raise ExtensionBuildError("cmake not found on PATH")
        output = Path(self.get_ext_fullpath(extension.name)).resolve()
        build_dir = self._cmake_build_dir()
        build_dir.mkdir(parents=True, exist_ok=True)
        configure = [
            cmake,
            "-S", str(SOURCE_DIR),
            "-B", str(build_dir),
            f"-DPython_EXECUTABLE={sys.executable}",
            "-DCMAKE_BUILD_TYPE=Release",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={output.parent}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY_RELEASE={output.parent}",
        ]
        jobs = self.parallel or os.cpu_count() or 1
        build = [cmake, "--build", str(build_dir), "--config", "Release", "--parallel", str(jobs)]
        for command in (configure, build):
            _run(command)
        if not output.exists():
            raise ExtensionBuildError(f"CMake finished but did not produce {output}")

    def _cmake_build_dir(self) -> Path:
        return Path(self.build_temp).resolve() / "cmake"


def _run(command: list[str]):
    try:
        result = subprocess.run(command, capture_output=True, text=True)
    except OSError as error:
        raise ExtensionBuildError(f"could not run {command[0]}: {error}") from error
    if result.returncode != 0:
        log_tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-20:])
        raise ExtensionBuildError(
            f"`{' '.join(command[:2])} ...` exited {result.returncode}; the end of its output:\n{log_tail}"
        )


setup(
    ext_modules=[CMakeExtension("backdoor_engine._C")],
    cmdclass={"build_ext": OptionalCMakeBuild},
)
