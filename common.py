"""Run plumbing shared by the scripts: errors, seeding, device, config + flags, safe files.

The bottom layer with paths.py: it imports nothing of the project. It imports torch only inside the functions
that use it, so that a grid's Slurm job (gridrun/step.py) writes its record with atomic_write in a fraction of the
seconds that importing torch takes.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import json
import math
import os
import random
import shutil
import signal
import sys
import tempfile
import threading
from typing import TYPE_CHECKING

import numpy as np
from tqdm import tqdm

if TYPE_CHECKING:
    import torch


class UsageError(Exception):
    """Bad command line or config (exit status 2)."""

    exit_code = 2


class MissingError(Exception):
    """A prerequisite file is missing or unusable (exit status 1)."""

    exit_code = 1


class DivergedError(Exception):
    """Training produced no usable model: a non-finite loss, or no epoch to keep (exit status 1)."""

    exit_code = 1


def run_first(script: str, args, *flags: str) -> str:
    """How a missing prerequisite gets made: 'run <script> <GPU-ID> <config> [flags] first'."""
    return " ".join(["run", script, str(args.gpu_id), args.config_path, *flags, "first"])


class Terminated(BaseException):
    """SIGTERM (kill, Slurm's scancel or time limit), raised like Ctrl-C's KeyboardInterrupt so that the
    staged models of an unfinished run are discarded on the way out."""


def _raise_terminated(signum, frame):
    raise Terminated()


def main_guard(main):
    """Run main(); turn our errors into one readable line on stderr and a non-zero exit. A log block the run
    left open (it ended before its last line) is closed with `Run ended early: <why>` (RunLog.end_open)."""
    signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        main()
    except (UsageError, MissingError, DivergedError) as err:
        fail(f"{err}", err.exit_code)
    except (KeyboardInterrupt, Terminated) as err:
        name, code = ("SIGTERM", 143) if isinstance(err, Terminated) else ("Ctrl-C", 130)
        fail(
            f"interrupted ({name}); every checkpoint in result/ is still a finished one (this run's "
            f"unfinished models were discarded); rerun the command to redo this step",
            code,
            f"interrupted ({name})",
        )
    except OSError as err:  # disk full, permission denied, a file where a folder should be...
        where = f" {err.filename}" if err.filename else ""
        fail(
            f"cannot read or write{where} ({err.strerror or type(err).__name__}); "
            f"check that path, its permissions and the free disk space",
            1,
        )
    except BaseException as err:  # a bug or sys.exit: the traceback (or exit status) as it is, the block closed
        torch = sys.modules.get("torch")  # a run that ran out of GPU memory has imported it
        if torch is not None and isinstance(err, torch.cuda.OutOfMemoryError):
            fail("out of GPU memory; lower --batch_size or pass another GPU-ID", 1)
        RunLog.end_open(f"{type(err).__name__}: {err}" if not isinstance(err, SystemExit) else f"exit {err.code}")
        raise
    RunLog.end_open("the run returned before its last log line")


def fail(message: str, code: int, why: str = None) -> None:
    """`error: message` on stderr, the open log blocks closed with why (default: the message), exit code."""
    RunLog.end_open(why or message)
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


def seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pick_device(gpu_id: int) -> torch.device:
    """GPU-ID k -> cuda:k; -1 or no CUDA -> cpu (said once)."""
    import torch

    if gpu_id < -1:
        raise UsageError(f"GPU-ID {gpu_id} is not valid; pass a CUDA device index (0, 1, ...) or -1 for the CPU")
    if gpu_id < 0 or not torch.cuda.is_available():
        why = "GPU-ID is -1" if gpu_id < 0 else "CUDA is not available"
        print(f"Running on CPU ({why}).")
        return torch.device("cpu")
    count = torch.cuda.device_count()
    if gpu_id >= count:
        raise UsageError(
            f"GPU-ID {gpu_id} does not exist ({count} CUDA device(s) visible); pass 0..{count - 1}, or -1 for the CPU"
        )
    return torch.device(f"cuda:{gpu_id}")


# ---------------------------------------------------------------- config + flags

MAX_BATCH = 2**31 - 1  # torch splits index tensors with a 32-bit-safe size; larger ones overflow
CONFIG_KEYS = {
    "dataset_name": str,
    "model_name": str,
    "epochs": int,
    "num_cls": int,
    "input_dim": int,
    "optimizer": str,
    "lr": float,
    "weight_decay": float,
}


def load_config(path: str) -> dict:
    if not os.path.isfile(path):
        raise UsageError(f"config file {path} not found; pass one of config/*.json, e.g. config/digits.json")
    try:
        with open(path) as f:
            config = json.load(f)
    except json.JSONDecodeError as err:
        raise UsageError(f"config {path} is not valid JSON ({err.msg} at line {err.lineno}); fix the file")
    except UnicodeDecodeError:
        raise UsageError(f"config {path} is not a text file; pass a JSON config such as config/digits.json")
    if not isinstance(config, dict):
        raise UsageError(f"config {path} must be a JSON object with keys {', '.join(CONFIG_KEYS)}")
    for key, value in config.items():
        if key not in CONFIG_KEYS:
            raise UsageError(f"config {path}: unknown key '{key}'; valid keys: {', '.join(CONFIG_KEYS)}")
        want = CONFIG_KEYS[key]
        ok = isinstance(value, want) and not isinstance(value, bool)
        if want is float and isinstance(value, int) and not isinstance(value, bool):
            ok = True
        if not ok:
            raise UsageError(f"config {path}: '{key}' must be {want.__name__}, got {value!r}; fix the config")
        if want is float and not math.isfinite(value):  # JSON's NaN/Infinity would train a NaN model
            raise UsageError(f"config {path}: '{key}' must be a finite number, got {value!r}; fix the config")
    missing = [k for k in CONFIG_KEYS if k not in config]
    if missing:
        raise UsageError(f"config {path}: missing key(s) {', '.join(missing)}; add them (see config/digits.json)")
    return config


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, like every other usage error
        raise UsageError(f"{message}; see '{self.prog} --help'")


def base_parser(description: str) -> argparse.ArgumentParser:
    """GPU-ID and config positionals plus the config keys as overridable flags."""
    parser = _Parser(description=description)
    parser.add_argument("gpu_id", metavar="GPU-ID", type=int, help="CUDA device index, -1 for the CPU")
    parser.add_argument("config_path", help="config JSON, e.g. config/digits.json")
    for key, typ in CONFIG_KEYS.items():
        parser.add_argument(f"--{key}", type=typ, default=None, help="overrides the config")
    parser.add_argument(
        "--seed", type=int, default=7, help="a seed other than 7 keeps its results in result/<ds>_<model>_seed<k>/"
    )
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument(
        "--amp",
        action="store_true",
        help="CUDA only: bfloat16 autocast for forward passes (faster; off = the paper's float32)",
    )
    parser.add_argument(
        "--quiet", action="store_true", help="no progress bars (they are also off when stdout is not a terminal)"
    )
    parser.add_argument(
        "--no_tensorboard", action="store_true", help="write no TensorBoard scalars under log/<ds>_<model>/tb/"
    )
    return parser


def parse_args(parser: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """Config values become defaults; explicit flags win."""
    args = parser.parse_args(argv)
    config = load_config(args.config_path)
    for key, value in config.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for key, value in vars(args).items():  # inf/nan learning rates, decays, thresholds train NaN models
        if isinstance(value, float) and not math.isfinite(value):
            raise UsageError(f"--{key} must be a finite number, got {value}")
    top = 2**32 - 1 - max(getattr(args, "shadow_num", 0), 0)  # shadows and their splits use seed + k, k <= shadow_num
    if not 0 <= args.seed <= top:
        within = (
            "numpy's seed range"
            if top == 2**32 - 1
            else f"numpy's seed range 0..{2**32 - 1} less --shadow_num {args.shadow_num}: shadow k uses seed + k + 1"
        )
        raise UsageError(f"--seed must be in 0..{top} ({within}), got {args.seed}")
    if not 1 <= args.batch_size <= MAX_BATCH:
        raise UsageError(f"--batch_size must be in 1..{MAX_BATCH}, got {args.batch_size}")
    if getattr(args, "shadow_num", 0) < 0:
        raise UsageError(f"--shadow_num must be >= 0, got {args.shadow_num}")
    return args


# ---------------------------------------------------------------- safe files


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def _interrupts_deferred():
    """SIGINT and SIGTERM that arrive in the block act when it ends, as they would have. torch.save turns an
    interrupt raised inside its writer into an I/O error (`unexpected pos`), which would report a Ctrl-C as
    a failed write. Handlers, not a signal mask: any thread may take the signal, the main thread acts on it."""
    signals = [s for s in (signal.SIGINT, signal.SIGTERM) if signal.getsignal(s) is not None]
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = []
    before = {s: signal.signal(s, lambda signum, frame: caught.append(signum)) for s in signals}
    try:
        yield
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)
        if caught:
            signal.raise_signal(caught[0])


def atomic_write(path: str, write) -> None:
    """Call write(file_object) on a temp file next to path, fsync, then rename over path. The file gets
    the permissions the umask gives a new file (mkstemp alone would make it 0600). A write that fails
    the way torch.save fails on a full disk (RuntimeError) becomes an OSError naming the file."""
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    remove_dead_temps(directory)
    try:
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=temp_prefix(os.path.basename(path)[:100]))
    except OSError as err:  # named after the file the user asked for, not the temp file
        raise OSError(err.errno, err.strerror, path)
    try:
        with os.fdopen(fd, "wb") as f:
            try:
                with _interrupts_deferred():
                    write(f)
                    f.flush()
            except RuntimeError as err:  # torch.save's "file write failed"
                full = shutil.disk_usage(directory).free < 16 << 20
                code = errno.ENOSPC if full else errno.EIO
                raise OSError(code, os.strerror(code) + ("" if full else f": {err}".splitlines()[0]), path)
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException as err:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(err, OSError) and err.filename == tmp:  # os.replace onto a folder, say
            raise OSError(err.errno, err.strerror, path)
        raise


def _host_mark() -> str:
    """.<host>- before the writer's pid in atomic_write's temp names (the host as in paths.staging_dir's)."""
    return f".{os.uname().nodename}-"


def temp_prefix(name: str) -> str:
    """.tmp_<name>.<host>-<pid>. : every temp file or folder this process makes, so remove_dead_temps can tell
    its owner."""
    return f".tmp_{name}{_host_mark()}{os.getpid()}."


def remove_dead_temps(directory: str) -> None:
    """Remove the temp files and folders (temp_prefix) in directory whose writer ran on this host and no longer
    runs: a write killed with -9 leaves its .tmp_<name>.<host>-<pid>.XXXX, and the next write in the folder,
    which is usually the same step run again, clears it."""
    mark = _host_mark()
    try:
        names = os.listdir(directory)
    except OSError:
        return
    for name in names:
        if not name.startswith(".tmp_") or mark not in name:
            continue
        pid = name[name.rfind(mark) + len(mark) :].split(".", 1)[0]
        if pid.isdigit() and not pid_alive(int(pid)):
            path = os.path.join(directory, name)
            with contextlib.suppress(OSError):
                if os.path.isdir(path) and not os.path.islink(path):  # a scratch folder (audit_dp's)
                    shutil.rmtree(path)
                else:
                    os.remove(path)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def check_writable(folder: str) -> None:
    """An OSError naming folder (main_guard's one line) unless a run can put files into it: a folder we
    can create files in, or nothing yet. Tried, not os.access: root passes os.access on a read-only mount."""
    if not os.path.lexists(folder):
        return
    if not os.path.isdir(folder):
        raise OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), folder)
    try:
        remove_dead_temps(folder)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=temp_prefix("probe"))
    except OSError as err:
        raise OSError(err.errno, err.strerror, folder)
    os.close(fd)
    os.remove(probe)


def save_torch(obj, path: str) -> None:
    import torch

    atomic_write(path, lambda f: torch.save(obj, f))


def save_npz(path: str, arrays: dict, meta: dict) -> None:
    """Arrays plus a flat dict of scalars (stored as 0-d arrays named meta_<key>) in one .npz, written
    atomically; nothing in it is pickled."""
    payload = dict(arrays)
    payload.update({f"meta_{k}": np.asarray(v) for k, v in meta.items()})
    atomic_write(path, lambda f: np.savez(f, **payload))


def read_npz(path: str) -> tuple:
    """(arrays, meta) of a save_npz file. Raises what np.load raises: each caller words its own error."""
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files if not k.startswith("meta_")}
        meta = {k[5:]: z[k].item() for k in z.files if k.startswith("meta_")}
    return arrays, meta


def load_torch(path: str, what: str, fix: str):
    """torch.load with weights_only=True and a readable error for missing or broken files."""
    if not os.path.isfile(path):
        raise MissingError(f"{what} {path} not found; {fix}")
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except OSError as err:  # unreadable (permissions, I/O): the file itself may be fine, so do not delete it
        raise MissingError(
            f"{what} {path} cannot be read ({err.strerror or type(err).__name__}); check its permissions and the disk"
        )
    except Exception as err:  # truncated zip, not a checkpoint, unsafe pickle...
        raise MissingError(f"{what} {path} is corrupt or not a checkpoint ({type(err).__name__}); delete it and {fix}")


class RunLog:
    """One run's block of lines in a text log that other runs may append to as well. The log is only
    appended to (never truncated); from its first line to close() the run holds an exclusive lock on
    the file (fcntl.flock), so two runs writing the same log at once write whole blocks, one after the
    other. Every line is flushed at once and echoed to stdout. A block still open when the script ends
    (main_guard) gets a last line `Run ended early: <why>`, which summarize.py shows as a failed run."""

    ENDED_EARLY = "Run ended early: "
    _open = []  # the logs whose block is open, oldest first

    def __init__(self, path: str):
        self.path, self.file = path, None

    def write(self, line: str) -> None:
        if self.file is None:
            os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
            self.file = open(self.path, "a")
            fcntl.flock(self.file, fcntl.LOCK_EX)  # waits while another run writes its block
            RunLog._open.append(self)
        self.file.write(line + "\n")
        self.file.flush()
        tqdm.write(line)  # print without breaking a live progress bar

    def close(self) -> None:
        if self.file is not None:
            self.file.close()  # releases the lock
            self.file = None
            RunLog._open.remove(self)

    @classmethod
    def end_open(cls, why: str) -> None:
        """Close every open block with `Run ended early: <why>` (one line; in the log file only)."""
        for log in list(cls._open):
            try:
                log.file.write(cls.ENDED_EARLY + " ".join(str(why).split()) + "\n")
                log.file.flush()
            except OSError:  # the disk that failed the run may refuse this line too
                pass
            try:
                log.close()
            except OSError:
                log.file = None
                cls._open.remove(log)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def log_gpu_usage(device: torch.device, log: RunLog = None) -> None:
    """On CUDA, once at the end of a run: the GPU's name, the run's peak allocated memory and, through NVML
    (nvidia-ml-py), the memory the whole GPU has in use out of its total and the driver: how much room is left
    for more steps per GPU (grid.py --jobs_per_gpu)."""
    if device.type != "cuda":
        return
    import torch

    peak = torch.cuda.max_memory_allocated(device) / 2**30
    line = f"GPU: {torch.cuda.get_device_name(device)}, peak memory allocated {peak:.3f} GiB"
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            props = torch.cuda.get_device_properties(device)  # by PCI address: CUDA_VISIBLE_DEVICES renumbers
            bus_id = f"{props.pci_domain_id:08X}:{props.pci_bus_id:02X}:{props.pci_device_id:02X}.0"
            handle = pynvml.nvmlDeviceGetHandleByPciBusId(bus_id)
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
            line += (
                f"; GPU memory in use {memory.used / 2**30:.1f} of {memory.total / 2**30:.1f} GiB, "
                f"driver {pynvml.nvmlSystemGetDriverVersion()}"
            )
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # NVML missing or refused (a container without it): the line without it
        pass
    if log:
        log.write(line)
    else:
        print(line)
