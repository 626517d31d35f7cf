"""The JIT build of the CUDA kernels: cache folders, one clear error without a GPU, locks that cannot go stale."""

import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from gspn_diffusers.ops import build, gspn_propagate


@pytest.fixture
def fresh_build_state(monkeypatch):
    monkeypatch.setattr(build, "_extension", None)
    monkeypatch.setattr(build, "_failure", None)


def test_cache_folder_is_tagged_by_torch_cuda_arch_and_sources(monkeypatch, tmp_path):
    monkeypatch.setenv("GSPN_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0")
    first = build.build_dir()
    assert first.parent == tmp_path
    assert torch.__version__.replace("+", "-") in first.name and "arch90" in first.name
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    assert build.build_dir() != first

    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0")
    copy = tmp_path / "csrc"
    copy.mkdir()
    for path in build.csrc_dir().iterdir():
        (copy / path.name).write_bytes(path.read_bytes())
    monkeypatch.setattr(build, "csrc_dir", lambda: copy)
    assert build.build_dir() == first
    (copy / "gspn_scan.cuh").write_text("// edited\n")
    assert build.build_dir() != first


def test_sources_are_found():
    names = {p.name for p in build.csrc_dir().iterdir()}
    assert {"gspn_binding.cpp", "gspn_float.cu", "gspn_scan.cuh", "gspn_rows.cuh", "gspn_columns.cuh", "gspn_tma.cuh",
            "gspn_step.cuh", "gspn_gradients.cuh"} <= names


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_unusable_backend_raises_one_clear_error(fresh_build_state):
    with pytest.raises(build.CUDABackendUnavailable, match='backend="reference"') as first:
        build.load_extension()
    with pytest.raises(build.CUDABackendUnavailable) as second:
        build.load_extension()
    assert str(second.value) == str(first.value)


def test_cuda_backend_refuses_cpu_tensors():
    x = torch.randn(1, 2, 3, 3)
    gates, lam = torch.randn(1, 4, 3, 1, 3, 3), torch.randn(1, 4, 2, 3, 3)
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        gspn_propagate(x, gates, lam, backend="cuda")


_HOLD_LOCK = textwrap.dedent(
    """
    import os, signal, sys, time
    from pathlib import Path
    from gspn_diffusers.ops import build
    handle = build._locked(Path(sys.argv[1]))
    print("locked", flush=True)
    if sys.argv[2] == "die":
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(60)
    """
)


def _holder(lock, mode):
    proc = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(lock), mode], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_lock_of_a_killed_builder_is_released(tmp_path, monkeypatch):
    lock = tmp_path / "gspn.flock"
    proc = _holder(lock, "die")
    assert proc.wait(timeout=30) == -signal.SIGKILL
    monkeypatch.setattr(build, "_LOCK_TIMEOUT_S", 5)
    handle = build._locked(lock)  # would time out if the dead holder's lock had survived
    handle.close()


def test_lock_held_by_a_live_builder_times_out_with_a_message(tmp_path, monkeypatch):
    lock = tmp_path / "gspn.flock"
    proc = _holder(lock, "hold")
    try:
        monkeypatch.setattr(build, "_LOCK_TIMEOUT_S", 1)
        with pytest.raises(build.CUDABackendUnavailable, match="another process building"):
            build._locked(lock)
    finally:
        proc.kill()
        proc.wait()
    assert os.path.exists(lock)
