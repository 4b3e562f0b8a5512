"""Structured run records (JSON) and per-sample attack scores (.npz), beside the text logs.

Every prune and attack run writes one record, result/<ds>_<model>/records/<kind>_<name>_<run id>.json,
and every attack run one scores file, result/<ds>_<model>/scores/<name>_<run id>.npz (docs/results.md: Reading
the results). The run id is the UTC start time to the microsecond, the host and the process id: one
process starts one run, and no two processes of one host share a pid at the same time, so no two runs
share a name, and the name never changes once the run has started. A record names its log file and the
byte offsets of its block there, which is how summarize.py tells that a log block and a record are the
same run.
"""

import json
import math
import os
import socket
import subprocess
import time
from datetime import datetime, timezone

import numpy as np

from common import atomic_write, check_writable
from paths import REPO_DIR, result_dir, run_name

FORMAT = 1  # the record layout below; bump it when a field changes meaning


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


def iso(moment: datetime) -> str:
    return moment.isoformat(timespec="microseconds").replace("+00:00", "Z")


def make_run_id(start: datetime) -> str:
    """<UTC start, microseconds>_<host>_<pid>: unique per run (see the module docstring)."""
    host = "".join(c for c in socket.gethostname().split(".")[0] if c.isalnum() or c == "-") or "host"
    return f"{start.strftime('%Y%m%dT%H%M%S%fZ')}_{host}_{os.getpid()}"


def code_version() -> dict:
    """{"commit": git HEAD of this code or None, "dirty": whether tracked or new files differ from it, or None}."""

    def git(*cmd):
        return subprocess.run(
            ["git", *cmd], cwd=REPO_DIR, capture_output=True, text=True, timeout=30, check=True
        ).stdout.strip()

    try:
        return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain"))}
    except (OSError, subprocess.SubprocessError):  # no git, not a checkout, a hung git
        return {"commit": None, "dirty": None}


def number(x):
    """A float for JSON: finite values as they are, nan/inf as the strings "nan", "inf", "-inf"
    (strict JSON has no such numbers; float() reads the strings back)."""
    x = float(x)
    return x if math.isfinite(x) else str(x)


def logged(x, digits=3):
    """x as the log line shows it (rounded to `digits` decimals), for JSON."""
    return number(f"{float(x):.{digits}f}")


def settings(args) -> dict:
    """vars(args) without what JSON cannot hold."""
    out = {}
    for key, value in vars(args).items():
        if isinstance(value, float):
            out[key] = number(value)
        elif value is None or isinstance(value, (bool, int, str)):
            out[key] = value
        elif isinstance(value, (list, tuple)) and all(isinstance(v, (bool, int, str)) for v in value):
            out[key] = list(value)
    return out


def run_fields(args, prefix: str, defend_arg=None, window=None) -> dict:
    """What names a run in summarize.py's table (defend_arg only for the defenses that carry it in their
    names, window only for the window defenses, as in the log's header line). The defense is the log file's
    <defend>: <name>_auto when args.auto lists a setting derived from the data."""
    return {
        "run_name": run_name(args),
        "dataset": args.dataset_name,
        "model": args.model_name,
        "pruner": args.pruner_name,
        "sparsity": float(args.prune_sparsity),
        "defense": (args.defend or "base") + ("_auto" if getattr(args, "auto", None) else ""),
        "defend_arg": None if defend_arg is None else float(defend_arg),
        "window": window,
        "weight_decay_mem": float(args.weight_decay_mem),
        "semantics": args.semantics,
        "tag": args.tag,
        "seed": args.seed,
        "prefix": prefix,
    }


def block_start(log, first_line: str) -> int:
    """Byte offset of a run's first log line, read right after writing it (the run holds the log's lock,
    so nobody wrote in between)."""
    return os.path.getsize(log.path) - len((first_line + "\n").encode())


class Recorder:
    """One run's record: fields gathered while it runs, written once at its end."""

    def __init__(self, kind: str, args, run: dict):
        self.start = utc_now()
        self.run_id = make_run_id(self.start)
        self.folder = result_dir(args)
        self.record = {
            "format": FORMAT,
            "kind": kind,
            "run_id": self.run_id,
            "start": iso(self.start),
            "end": None,
            "code": code_version(),
            "run": run,
            "settings": settings(args),
            "log": None,
            "results": {},
        }

    @property
    def results(self) -> dict:
        return self.record["results"]

    def check_writable(self) -> None:
        """Before the run's first log line: the folders its record and scores go to can be written."""
        for sub in ("records", "scores"):
            check_writable(os.path.join(self.folder, sub))

    def file_name(self, name: str, ext: str) -> str:
        return f"{name}_{self.run_id}.{ext}"

    def save_scores(self, name: str, arrays: dict) -> str:
        """scores/<name>_<run id>.npz (no object arrays, so np.load needs no pickle); returns its path."""
        path = os.path.join(self.folder, "scores", self.file_name(name, "npz"))
        atomic_write(path, lambda f: np.savez(f, **arrays))
        self.record["scores"] = path
        return path

    def save(self, name: str, log, log_start: int) -> str:
        """records/<kind>_<name>_<run id>.json, naming the log block [log_start, end of log). Call it before
        log.close(), while the run still holds the log's lock."""
        self.record["log"] = {"path": log.path, "offset": log_start, "end": os.path.getsize(log.path)}
        self.record["end"] = iso(utc_now())
        path = os.path.join(self.folder, "records", self.file_name(f"{self.record['kind']}_{name}", "json"))
        text = json.dumps(self.record, indent=1, allow_nan=False) + "\n"
        atomic_write(path, lambda f: f.write(text.encode()))
        return path


# ---------------------------------------------------------------- reading


class RecordError(Exception):
    """A record file that cannot be used (its message says why)."""


def read_record(path: str) -> dict:
    """The record in `path`, checked for the fields summarize.py needs; RecordError otherwise."""
    try:
        with open(path, "rb") as f:
            text = f.read().decode()
    except (OSError, UnicodeDecodeError) as err:
        raise RecordError(f"unreadable ({getattr(err, 'strerror', None) or type(err).__name__})")
    if not text.strip():
        raise RecordError("empty file")
    try:
        record = json.loads(text)
    except json.JSONDecodeError as err:
        raise RecordError(f"not valid JSON ({err.msg} at line {err.lineno})")
    if not isinstance(record, dict):
        raise RecordError(f"a JSON {type(record).__name__}, not an object")
    if record.get("kind") not in ("prune", "attack"):
        raise RecordError("no 'kind' prune or attack")
    for key, kind in (("run_id", str), ("start", str), ("run", dict), ("results", dict)):
        if not isinstance(record.get(key), kind):
            raise RecordError(f"'{key}' missing or not a {kind.__name__}")
    log = record.get("log")
    if log is not None and not (
        isinstance(log, dict) and isinstance(log.get("path"), str) and isinstance(log.get("offset"), int)
    ):
        raise RecordError("'log' is not {path, offset, end}")
    return record


def find_records(result_root: str) -> tuple:
    """(records, problems) of result_root/<ds>_<model>/records/*.json: the usable records, each with
    its file as record["file"], and one "<file>: <why>" line per record that is not."""
    records, problems = [], []
    if not os.path.isdir(result_root):
        return records, problems
    for folder in sorted(os.listdir(result_root)):
        sub = os.path.join(result_root, folder, "records")
        if not os.path.isdir(sub):
            continue
        for name in sorted(os.listdir(sub)):
            path = os.path.join(sub, name)
            if not name.endswith(".json") or name.startswith(".tmp_"):
                continue
            try:
                record = read_record(path)
            except RecordError as err:
                problems.append(f"{path}: {err}")
                continue
            record["file"] = path
            records.append(record)
    return records, problems


def record_time(record: dict) -> float:
    """The record's end (else start) as seconds since the epoch, for ordering runs."""
    for key in ("end", "start"):
        try:
            return datetime.fromisoformat(record[key].replace("Z", "+00:00")).timestamp()
        except (KeyError, AttributeError, TypeError, ValueError):
            continue
    return time.time()
