"""The installed llama-cpp-python is the portable build (scripts/llama_wheel.py), not a native one.

A native build on a Xeon with AMX dies with SIGSEGV in ``ggml_backend_amx_mul_mat`` on its first
matrix multiplication; these tests read what was actually installed: the compiled feature list,
the machine code of the CPU backend, and the files against the cached wheel's RECORD.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from guard.ops.local_model import build_features
from tests.llama import requires_llama

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import llama_wheel  # noqa: E402  (a stdlib-only script, run before the package is installed)

pytestmark = [pytest.mark.llama, requires_llama]


def test_compiled_features_are_portable():
    features = build_features()
    assert features is not None
    print(f"\n{features}")
    assert "AVX2 = 1" in features and "FMA = 1" in features and "F16C = 1" in features
    for name in ("AVX512", "AMX"):
        assert f"{name} = 1" not in features and f"{name}_INT8 = 1" not in features


@pytest.mark.skipif(shutil.which("objdump") is None, reason="objdump (binutils) is not installed")
def test_cpu_backend_has_no_amx_or_avx512_instructions():
    lib = Path(importlib.util.find_spec("llama_cpp").origin).parent / "lib" / "libggml-cpu.so"  # type: ignore[union-attr, arg-type]
    code = subprocess.run(["objdump", "-d", "--no-show-raw-insn", str(lib)], capture_output=True, text=True,
                          check=True).stdout
    assert "ldtilecfg" not in code and "tdpb" not in code  # AMX tile instructions
    assert "%zmm" not in code  # AVX512 registers
    assert "%ymm" in code and "vfmadd" in code  # AVX2 and FMA are kept


def test_installed_files_match_the_cached_portable_wheel():
    wheel = llama_wheel.find_wheel(llama_wheel.cache_dir())
    if wheel is None:
        pytest.skip(f"no portable wheel in {llama_wheel.cache_dir()}")
    assert wheel.parent.name == "portable"
    assert llama_wheel.VERSION in wheel.name
    assert llama_wheel.is_installed_from(wheel, sys.executable)


def test_cache_key_and_progress_line():
    assert llama_wheel.cache_dir(root=Path("/c")) == Path("/c/portable")
    other = llama_wheel.cache_dir("-DGGML_NATIVE=ON", root=Path("/c"))
    assert other.parent == Path("/c") and other.name.startswith("cmake-") and other.name != "portable"
    log = b"-- Configuring done\n[12/240] Building C object ggml.c.o\n[13/240] Building CXX object ops.cpp.o\n"
    assert llama_wheel.progress_line(log, 125) == "compiling: step 13/240 (5%), 2m05s elapsed"
    assert llama_wheel.progress_line(b"-- Detecting C compiler\n", 9) == "preparing the build (cmake), 0m09s elapsed"
