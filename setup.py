"""Builds the one extension, pymerge._C, from the sources listed in csrc/SOURCES.txt.

C++ sources always build; CUDA sources build when the installed torch is a CUDA build and a CUDA
toolkit is found (or PYMERGE_FORCE_CUDA=1). PYMERGE_FORCE_CPU=1 skips them.
"""
import os
from pathlib import Path

from setuptools import find_packages, setup
from torch.utils import cpp_extension

ROOT = Path(__file__).parent


def read_sources():
    sections, current = {"cpu": [], "cuda": []}, None
    for line in (ROOT / "csrc" / "SOURCES.txt").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            current = line.strip("[]")
        else:
            sections[current].append(line)
    return sections


def want_cuda():
    if os.environ.get("PYMERGE_FORCE_CPU") == "1":
        return False
    if os.environ.get("PYMERGE_FORCE_CUDA") == "1":
        return True
    import torch

    return torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None


def extension():
    sources = read_sources()
    cxx = ["-O3", "-std=c++20", "-fopenmp"]
    macros = [("PYMERGE_PYTHON_MODULE", None)]
    include_dirs = [str(ROOT / "csrc" / "include")]
    if want_cuda():
        macros.append(("PYMERGE_WITH_CUDA", None))
        return cpp_extension.CUDAExtension(
            "pymerge._C",
            sources["cpu"] + sources["cuda"],
            include_dirs=include_dirs,
            define_macros=macros,
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "--expt-relaxed-constexpr", "-std=c++20"]},
            extra_link_args=["-fopenmp"],
        )
    return cpp_extension.CppExtension(
        "pymerge._C",
        sources["cpu"],
        include_dirs=include_dirs,
        define_macros=macros,
        extra_compile_args={"cxx": cxx},
        extra_link_args=["-fopenmp"],
    )


setup(
    packages=find_packages(include=["pymerge", "pymerge.*"]),
    ext_modules=[extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension},
)
