"""Build `erpd._C` by driving CMakeLists.txt with the ninja generator.

Environment knobs:
  ERPD_SKIP_CUDA_BUILD=1   build only the C++ CPU path even if torch has CUDA
  ERPD_CUDA_ARCHS="90;100" CUDA architectures (CMAKE_CUDA_ARCHITECTURES), default 90 (Hopper)
  MAX_JOBS=N               parallel compile jobs (default: number of CPUs)
  ERPD_BUILD_TYPE          CMake build type (default Release)
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def _want_cuda() -> bool:
    if os.environ.get("ERPD_SKIP_CUDA_BUILD", "0") == "1":
        return False
    import torch

    if torch.version.cuda is None:
        return False
    if shutil.which("nvcc") is None and not os.environ.get("CUDA_HOME"):
        raise RuntimeError(
            "torch was built with CUDA but nvcc was not found; install the CUDA toolkit "
            "or set ERPD_SKIP_CUDA_BUILD=1 to build only the CPU path"
        )
    return True


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        import pybind11
        import torch

        extdir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_temp = Path(self.build_temp) / ext.name
        build_temp.mkdir(parents=True, exist_ok=True)

        cmake = shutil.which("cmake")
        if cmake is None:
            raise RuntimeError("cmake not found; `pip install cmake` (see requirements/requirements.txt)")
        try:
            import ninja

            ninja_bin = str(Path(ninja.BIN_DIR) / "ninja")
        except ImportError:
            ninja_bin = shutil.which("ninja") or "ninja"

        with_cuda = _want_cuda()
        args = [
            f"-S{ROOT}",
            f"-B{build_temp}",
            "-GNinja",
            f"-DCMAKE_MAKE_PROGRAM={ninja_bin}",
            f"-DCMAKE_BUILD_TYPE={os.environ.get('ERPD_BUILD_TYPE', 'Release')}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={extdir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path};{pybind11.get_cmake_dir()}",
            f"-DERPD_WITH_CUDA={'ON' if with_cuda else 'OFF'}",
        ]
        if with_cuda:
            args.append(f"-DCMAKE_CUDA_ARCHITECTURES={os.environ.get('ERPD_CUDA_ARCHS', '90')}")
        jobs = os.environ.get("MAX_JOBS") or str(os.cpu_count() or 1)
        subprocess.run([cmake, *args], check=True)
        subprocess.run([cmake, "--build", str(build_temp), "-j", jobs], check=True)


setup(ext_modules=[CMakeExtension("erpd._C")], cmdclass={"build_ext": CMakeBuild})
