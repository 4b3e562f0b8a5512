"""Shared test helpers: the repo on sys.path, and running a script as a subprocess in a folder."""
import os
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

# Tests use small tensors; on a shared, busy CPU, multi-threaded kernels spend most of their time
# waiting for each other (a 2-epoch attack: 9 s with 2 threads vs 0.5 s with 1).
torch.set_num_threads(1)


def run_script(script, *args, cwd, check=True, timeout=600):
    """Run `python REPO/script args...` with cwd as working directory (so result/, log/, data/ land
    there) on the CPU with one thread (see above). Returns the CompletedProcess; with check, a
    non-zero exit fails the test with the script's output."""
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONHASHSEED="0", OMP_NUM_THREADS="1")
    cmd = [sys.executable, os.path.join(REPO, script), *map(str, args)]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-3000:]}"
                    f"\n--- stderr\n{proc.stderr[-3000:]}")
    return proc

