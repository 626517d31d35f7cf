import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_sdxl_path(tmp_path_factory):
    """A tiny random SDXL pipeline folder, written once per pytest run."""
    from gspn_diffusers.testing import save_tiny_sdxl

    return save_tiny_sdxl(tmp_path_factory.mktemp("tiny_sdxl"), seed=0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch_two_processes(tmp_path: Path, script: str | Path, *script_args: str,
                         timeout: int = 900) -> subprocess.CompletedProcess:
    """Run ``script`` with ``script_args`` in 2 CPU processes; fails the test after ``timeout`` seconds."""
    launcher = Path(sys.executable).parent / "accelerate"
    prefix = [str(launcher), "launch"] if launcher.exists() else [sys.executable, "-m", "accelerate.commands.launch"]
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1", HF_HOME=str(tmp_path / "hf_home"),
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    command = prefix + ["--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
                        "--dynamo_backend", "no", "--main_process_ip", "127.0.0.1", "--main_process_port",
                        str(_free_port()), str(script), *script_args]
    # A process group of its own, so that a timeout ends the launcher and both ranks, not just the launcher.
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        pytest.fail(f"accelerate launch did not finish in {timeout} s:\n{stdout[-3000:]}\n{stderr[-3000:]}")
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


@pytest.fixture(scope="session")
def launch_two_processes():
    """``launch_two_processes(tmp_path, script, *args, timeout=900)``: ``script`` in 2 CPU processes through
    `accelerate launch` (gloo), its CompletedProcess; fails the test at the timeout."""
    return _launch_two_processes
