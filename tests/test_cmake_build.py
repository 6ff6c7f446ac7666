"""CMake builds the ops as a plain library that a fresh torch process loads with torch.ops.load_library.

Slow (a full C++ build): runs only with PYMERGE_TEST_CMAKE=1.
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.environ.get("PYMERGE_TEST_CMAKE") != "1", reason="set PYMERGE_TEST_CMAKE=1 (builds with CMake)"),
    pytest.mark.skipif(shutil.which("cmake") is None, reason="needs cmake"),
]


def test_cmake_library_loads_without_the_python_package(tmp_path):
    build = tmp_path / "build"
    subprocess.run(["cmake", "-S", str(ROOT), "-B", str(build), f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}"],
                   check=True, capture_output=True)
    subprocess.run(["cmake", "--build", str(build), "-j2"], check=True, capture_output=True)
    lib = build / "libpymerge_ops.so"
    assert lib.exists()
    # A fresh process, outside the source tree, that never imports pymerge.
    code = (
        "import sys, torch\n"
        f"torch.ops.load_library({str(lib)!r})\n"
        "assert not any(m.startswith('pymerge') for m in sys.modules)\n"
        "p = [torch.tensor([1.0, 2.0]), torch.tensor([3.0, 6.0])]\n"
        "f = [torch.tensor([0.0, 1.0]), torch.tensor([0.0, 3.0])]\n"
        "print(torch.ops.pymerge.fisher_merge(p, f, [0.5, 0.5], 1e-8, 'target').tolist())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, cwd=tmp_path)
    assert out.stdout.strip() == "[1.0, 5.0]"
