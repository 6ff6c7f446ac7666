"""Builds the one extension, pymerge._C, from the sources listed in csrc/SOURCES.txt.

C++ sources always build; CUDA sources build when the installed torch is a CUDA build and a CUDA
toolkit is found (or PYMERGE_FORCE_CUDA=1). PYMERGE_FORCE_CPU=1 skips them.
"""
import os
import re
import subprocess
import sys
import time
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


def progress_stream():
    """Where build progress goes: the terminal when there is one (pip captures the build's stdout and stderr and
    shows them only with -v, so a plain `pip install .` would otherwise sit silent for minutes), else stderr."""
    try:
        return open("/dev/tty", "w")
    except OSError:
        return sys.stderr


def run_ninja_with_progress(build_directory, verbose, error_prefix):
    """Stands in for torch.utils.cpp_extension._run_ninja_build: the same ninja build, but one short line per
    finished step ("pymerge: [2/7] compiled csrc/cpu/merge_ops.cpp (40 s)") and the time taken, instead of
    silence (or ninja -v's screen-long command lines). The full compiler output is shown when a step fails."""
    jobs = os.environ.get("MAX_JOBS")
    command = ["ninja"] + (["-j", jobs] if jobs else [])
    out = progress_stream()
    print(f"pymerge: compiling the C++{'/CUDA' if want_cuda() else ''} extension with ninja "
          f"({jobs or 'default'} jobs; a few minutes on 2 cores)", file=out, flush=True)
    t0 = time.time()
    proc = subprocess.Popen(command, cwd=build_directory, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=os.environ.copy())
    log = []
    for line in proc.stdout:
        log.append(line)
        step = re.match(r"\[(\d+/\d+)\] (.*)", line)
        if step:
            srcs = re.findall(r"(\S+\.(?:cpp|cc|cu))(?:\s|$)", step.group(2))
            what = f"compiled {os.path.relpath(srcs[-1], ROOT)}" if srcs else "linked pymerge/_C"
            print(f"pymerge: [{step.group(1)}] {what} ({time.time() - t0:.0f} s)", file=out, flush=True)
        elif verbose:
            print(line, end="", file=out, flush=True)
    if proc.wait() != 0:
        message = error_prefix + "".join(log)
        print(message, file=sys.stderr, flush=True)
        raise RuntimeError(message)
    print(f"pymerge: compiled in {time.time() - t0:.0f} s", file=out, flush=True)
    if out is not sys.stderr:
        out.close()


cpp_extension._run_ninja_build = run_ninja_with_progress


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
