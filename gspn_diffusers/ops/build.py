"""Just-in-time build of the CUDA kernels in csrc/ with ninja, cached per toolchain and GPU.

The build folder is ``$GSPN_CACHE_DIR`` or ``~/.cache/gspn_diffusers`` (``$XDG_CACHE_HOME`` respected),
then one folder per (torch version, CUDA version, target architectures, hash of the sources): a torch
upgrade, another GPU or edited sources never load a stale build, and a second process finds the build
ready. Concurrent builders (several processes, eight accelerate ranks) serialise on an ``flock``, which
the kernel releases when its holder dies, so a killed build never leaves a lock behind to wait on.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import time
from pathlib import Path

import torch

_SOURCES = ("gspn_binding.cpp", "gspn_float.cu", "gspn_half.cu", "gspn_bfloat16.cu")
_LOCK_TIMEOUT_S = float(os.environ.get("GSPN_BUILD_LOCK_TIMEOUT", 1800))
_extension = None
_failure: str | None = None


class CUDABackendUnavailable(RuntimeError):
    """The CUDA kernels cannot be built or loaded on this machine."""


def csrc_dir() -> Path:
    """The CUDA sources: inside the installed package, or csrc/ of a source checkout."""
    here = Path(__file__).resolve().parent.parent
    for candidate in (here / "csrc", here.parent / "csrc"):
        if (candidate / _SOURCES[0]).is_file():
            return candidate
    raise CUDABackendUnavailable(f"the CUDA sources ({_SOURCES[0]}, ...) are not in {here / 'csrc'}")


def _arch_tag() -> str:
    listed = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if listed:
        return "arch" + "".join(ch for ch in listed if ch.isalnum() or ch == "_")
    major, minor = torch.cuda.get_device_capability()
    return f"sm{major}{minor}"


def build_dir() -> Path:
    """The cache folder of this torch, CUDA, GPU architecture and source version."""
    root = os.environ.get("GSPN_CACHE_DIR")
    if root is None:
        cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = os.path.join(cache, "gspn_diffusers")
    digest = hashlib.sha256()
    src = csrc_dir()
    for path in sorted(src.iterdir()):
        if path.suffix in (".cu", ".cuh", ".cpp", ".h"):
            digest.update(path.name.encode() + path.read_bytes())
    tag = f"torch{torch.__version__}_cuda{torch.version.cuda}_{_arch_tag()}_{digest.hexdigest()[:12]}"
    return Path(root) / tag.replace("+", "-")


def _locked(lock_path: Path):
    handle = open(lock_path, "a+")
    deadline = time.monotonic() + _LOCK_TIMEOUT_S
    while True:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return handle
        except BlockingIOError:
            if time.monotonic() > deadline:
                handle.close()
                raise CUDABackendUnavailable(
                    f"waited {_LOCK_TIMEOUT_S:.0f} s for another process building the CUDA kernels ({lock_path})"
                ) from None
            time.sleep(0.5)


def load_extension():
    """Build (once) and import the kernels; raise CUDABackendUnavailable with the reason if impossible."""
    global _extension, _failure
    if _extension is not None:
        return _extension
    if _failure is not None:
        raise CUDABackendUnavailable(_failure)
    try:
        _extension = _build()
    except Exception as err:  # noqa: BLE001 - any build failure becomes one clear error
        _failure = (
            f"gspn_propagate: the CUDA kernels could not be built or loaded ({type(err).__name__}: {err}). "
            "They need the CUDA toolkit (nvcc) matching torch's CUDA "
            f"{torch.version.cuda} and ninja (pip install ninja). To run the slow PyTorch reference on the GPU "
            "instead, pass backend=\"reference\" explicitly."
        )
        raise CUDABackendUnavailable(_failure) from err
    return _extension


def _build():
    from torch.utils import cpp_extension

    if not torch.cuda.is_available():
        raise RuntimeError("torch sees no CUDA device")
    if cpp_extension.CUDA_HOME is None:
        raise RuntimeError("no CUDA toolkit found (set CUDA_HOME or put nvcc on PATH)")
    directory = build_dir()
    directory.mkdir(parents=True, exist_ok=True)
    src = csrc_dir()
    handle = _locked(directory / "gspn.flock")
    try:
        # torch's own lock file is left behind when a build is killed; we hold the only builder's lock.
        (directory / "lock").unlink(missing_ok=True)
        return cpp_extension.load(
            name="gspn_diffusers_cuda",
            sources=[str(src / name) for name in _SOURCES],
            build_directory=str(directory),
            extra_cflags=["-O3", "-std=c++17"],
            extra_cuda_cflags=["-O3", "-std=c++17", "--use_fast_math", "-lineinfo"],
            extra_include_paths=[str(src)],
            verbose=os.environ.get("GSPN_BUILD_VERBOSE") == "1",
        )
    finally:
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()
