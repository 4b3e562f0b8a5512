"""The prepared GPU check: every registered defense and attack, every image model and the grid on CUDA, in one go,
ending in a PASS/FAIL table. Run it through bench/gpu_check.sh, which copies the repo to a scratch folder first
(this script writes result/, log/ and grid files where it runs).

python bench/gpu_check.py [--cpu-dry-run] [--out DIR]

Items, in order (each one a row of the summary table, with its time and the number worth keeping):
  1. defense <name> (<semantics>): every registered defense prunes digits (--prune_iter 2 --prune_epochs 2,
     2 shadows) and every registered attack attacks it (--adaptive for the defenses), in both --semantics;
     both grids run through grid.py, packed 4 steps per GPU (the dry run: release only). Then one row per
     registered attack: its lines are in every defense's attack block.
  2. model <name> [--amp]: one training epoch of each image model on CIFAR-shaped random tensors
     (bench/bench_train.py): seconds per epoch, the ratio to a bare loop, peak GPU memory.
  3. agreement: one tiny digits chain on the CPU and on CUDA, and the CPU's models attacked on CUDA; the
     pruned accuracies and attack accuracies side by side (training on two devices draws other numbers; the
     same models must score alike up to float reordering).
  4. grid: the README's main job (grids/digits.json) with --gpus 0 --jobs_per_gpu 2, timed, and the
     GPU line of the logs.
Exit status 1 if any item failed. --cpu-dry-run runs the same items on the CPU with the smallest settings
(the CPU stands in for the GPU, and agreement compares the CPU with itself), so that a mistake in this script
shows in CI, not in the first minutes of a lent GPU. Downloads nothing.
"""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from attacks import ATTACKS  # noqa: E402
from defenses import DEFENSES, SEMANTICS  # noqa: E402
from gridrun.plan import expand  # noqa: E402
from gridrun.spec import Grid, setting_keys  # noqa: E402
from models import TARGET_MODELS  # noqa: E402

CONFIG = "config/digits.json"
IMAGE_MODELS = [m for m in TARGET_MODELS if m != "columnfc"]  # columnfc is the tabular model
WINDOW = {"stride": 1, "width": 15, "mem_thre": 0.3}  # digits' own settings (grids/digits.json)


class Sizes:
    """How big each item runs: small on the GPU (minutes), smallest on the CPU dry run (CI)."""

    def __init__(self, dry):
        self.device = "-1" if dry else "0"
        self.epochs = 1 if dry else 5  # pretraining epochs in items 1 and 3
        self.attack_epochs = 1 if dry else 10  # SAMIA and the NN attacks' training epochs
        self.image_rows = 8 if dry else 4096  # rows of one image-model epoch
        self.repeat = 1 if dry else 3
        self.grid_flags = ["--jobs", "2"] if dry else ["--gpus", "0", "--jobs_per_gpu"]
        # both on the GPU; the dry run checks the script, whose code is the same for either, so one (CI time)
        self.semantics = SEMANTICS[:1] if dry else SEMANTICS
        self.timeout = 600


def defend_args():
    """defend_arg of each baseline as the digits baselines grid sets it (4 for one it does not list)."""
    with open(os.path.join(REPO, "grids", "digits_baselines.json")) as f:
        listed = {e["defend"]: e["defend_arg"] for e in json.load(f)["defenses"] if "defend_arg" in e}
    return {name: listed.get(name, 4) for name in DEFENSES}


def defense_grid(semantics, sizes):
    """A grid of every registered defense with tiny settings, attacked by every registered attack."""
    entries, args = [], defend_args()
    for name, cls in DEFENSES.items():
        required, _ = setting_keys(cls)
        entries.append({"defend": name, **{k: WINDOW[k] if k in WINDOW else args[name] for k in sorted(required)}})
    return {
        "configs": [CONFIG],
        "pruners": "iter_prunetxt",
        "sparsities": [0.6],
        "prune_iter": 2,
        "shadow_num": 2,
        "attacks": ",".join(ATTACKS),
        "semantics": semantics,
        "defenses": entries,
        "overrides": {
            "pretrain": {"epochs": sizes.epochs, "no_tensorboard": True},
            "prune": {"prune_epochs": 2, "epochs": sizes.epochs, "no_tensorboard": True},
            "attack": {"attack_epochs": sizes.attack_epochs, "no_tensorboard": True},
        },
    }


def run(argv, out, name, timeout, cwd="."):
    """Run argv (python first) in cwd; its output to out/<name>.log. Returns (exit status, output)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    try:
        proc = subprocess.run(
            [sys.executable, *argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
        )
        code, text = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as err:
        code, text = "timeout", f"{err.stdout or ''}{err.stderr or ''}\n(stopped after {timeout} s)"
    with open(os.path.join(out, f"{name}.log"), "w") as f:
        f.write(text if isinstance(text, str) else text.decode(errors="replace"))
    return code, text if isinstance(text, str) else text.decode(errors="replace")


def last_block(log_file, first_line_prefix):
    """The lines of the last block of log_file that starts with a line beginning with first_line_prefix."""
    try:
        with open(log_file) as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    starts = [i for i, line in enumerate(lines) if line.startswith(first_line_prefix)]
    return lines[starts[-1] :] if starts else []


def numbers(lines, pattern):
    """{name: value} of the lines matching pattern (groups: name, value)."""
    found = {}
    for line in lines:
        m = re.match(pattern, line)
        if m:
            found[m.group(1)] = float(m.group(2))
    return found


class Check:
    def __init__(self, out, dry):
        self.out, self.dry, self.rows = out, dry, []
        self.sizes = Sizes(dry)

    def row(self, item, ok, seconds, note):
        self.rows.append((item, "PASS" if ok else "FAIL", seconds, note))
        shown = "-" if seconds is None else f"{seconds:.1f}"
        print(f"{'PASS' if ok else 'FAIL'}  {item}  ({shown} s)  {note}", flush=True)

    # ------------------------------------------------------------ 1. every defense, every attack

    def defenses(self):
        blocks = {}
        for semantics in self.sizes.semantics:
            path = os.path.join(self.out, f"grid_defenses_{semantics}.json")
            with open(path, "w") as f:
                json.dump(defense_grid(semantics, self.sizes), f, indent=1)
            flags = self.sizes.grid_flags + ([] if self.dry else ["4"])
            start = time.monotonic()
            code, text = run(
                ["grid.py", path, "--no_summary", *flags], self.out, f"grid_defenses_{semantics}", self.sizes.timeout
            )
            print(
                f"   grid of every defense ({semantics}): exit {code} in {time.monotonic() - start:.0f} s", flush=True
            )
            steps = {s.name: s for s in expand(Grid(path, path))}
            for name, _cls in DEFENSES.items():
                prune = next(s for s in steps.values() if s.kind == "prune" and step_defense(s) == name)
                attack = next(s for s in steps.values() if s.kind == "attack" and prune.name in s.needs)
                records = [read_json(s.record) for s in (prune, attack)]
                block = last_block(attack.log, "Victim pruned model test accuracy")
                reported = numbers(block, r"(\S+) attack accuracy: (\S+)")
                ok = all(records) and all(r["exit_status"] == 0 for r in records) and f"Semantics: {semantics}" in block
                seconds = sum(r["seconds"] for r in records) if all(records) else None
                missing = [n for a in ATTACKS.values() for n in a.reports if n not in reported]
                note = (
                    f"prune {records[0]['seconds']:.1f} s, attack {records[1]['seconds']:.1f} s"
                    if all(records)
                    else f"step failed: see {self.out}/grid_defenses_{semantics}.log and "
                    f"log/grid/{(attack if records[0] else prune).name}.err"
                )
                if ok and missing:
                    ok, note = False, f"no line for {', '.join(missing)}"
                self.row(f"defense {name} ({semantics})", ok, seconds, note)
                blocks[(name, semantics)] = reported
        for attack_name, attack in ATTACKS.items():
            hits = [k for k, reported in blocks.items() if all(n in reported for n in attack.reports)]
            values = [reported[n] for reported in blocks.values() for n in attack.reports if n in reported]
            span = f", accuracy {min(values):.1f}-{max(values):.1f}" if values else ""
            self.row(
                f"attack {attack_name}",
                len(hits) == len(blocks),
                None,
                f"{'/'.join(attack.reports)} in {len(hits)}/{len(blocks)} defense runs{span}",
            )

    # ------------------------------------------------------------ 2. image models

    def models(self):
        device = "cpu" if self.dry else "cuda:0"
        for model in IMAGE_MODELS:
            for amp in ([], ["--amp"]):
                item = f"model {model}{' --amp' if amp else ''}"
                code, text = run(
                    [
                        "bench/bench_train.py",
                        "--device",
                        device,
                        "--only",
                        model,
                        *amp,
                        "--rows",
                        str(self.sizes.image_rows),
                        "--repeat",
                        str(self.sizes.repeat),
                    ],
                    self.out,
                    item.replace(" ", "_").replace("--", ""),
                    self.sizes.timeout,
                )
                row = next((line.split() for line in text.splitlines() if line.strip().startswith(model + " ")), None)
                peak = re.search(r"peak GPU memory allocated: (\S+) GiB", text)
                if code != 0 or row is None:
                    self.row(item, False, None, f"exit {code}: {text.strip().splitlines()[-1:] or ''}")
                    continue
                seconds = float(row[2])
                note = (
                    f"{seconds:.3f} s per epoch of {row[1]} rows ({1e4 * seconds / int(row[1]):.2f} s per 10k), "
                    f"{row[4]}x a bare loop, peak {peak.group(1) + ' GiB' if peak else 'n/a (CPU)'}"
                )
                self.row(item, True, seconds, note + ("" if not amp or not self.dry else "; --amp is CUDA only"))

    # ------------------------------------------------------------ 3. CPU vs CUDA

    def chain(self, folder, device, steps=("pretrain", "prune", "attack")):
        """The tiny digits chain in folder (a scratch copy of the repo) on device; (ok, seconds, numbers)."""
        common = [CONFIG, "--quiet", "--no_tensorboard"]
        where = ["--pruner_name", "iter_prunetxt", "--prune_sparsity", "0.6", "--shadow_num", "2"]
        argv = {
            "pretrain": ["pretrain_modi.py", device, *common, "--shadow_num", "2", "--epochs", str(self.sizes.epochs)],
            "prune": ["prune_modi.py", device, *common, *where, "--prune_iter", "2", "--prune_epochs", "2"],
            "attack": [
                "mia_modi.py",
                device,
                *common,
                *where,
                "--attacks",
                ",".join(ATTACKS),
                "--attack_epochs",
                str(self.sizes.attack_epochs),
            ],
        }
        start = time.monotonic()
        for step in steps:
            code, _ = run(
                argv[step], self.out, f"agreement_{os.path.basename(folder)}_{step}", self.sizes.timeout, cwd=folder
            )
            if code != 0:
                return False, time.monotonic() - start, {}
        log_file = os.path.join(folder, "log", "digits_columnfc", "iter_prunetxt_0.6_base.txt")
        block = last_block(log_file, "Victim pruned model test accuracy")
        found = numbers(block, r"Victim (pruned) model test accuracy: (\S+)")
        found.update(numbers(block, r"(\S+) attack accuracy: (\S+)"))
        with open(log_file) as f:
            found.update(numbers(f.read().splitlines(), r"(victim iter \d+) best model: Accuracy (\S+),"))
        return True, time.monotonic() - start, found

    def agreement(self):
        gpu = self.sizes.device
        folders = {name: os.path.join(self.out, "agreement", name) for name in ("cpu", "gpu", "cpu_models_on_gpu")}
        for folder in folders.values():
            shutil.rmtree(folder, ignore_errors=True)
            copy_code(folder, self.out)
        ok_cpu, t_cpu, cpu = self.chain(folders["cpu"], "-1")
        ok_gpu, t_gpu, on_gpu = self.chain(folders["gpu"], gpu)
        if ok_cpu:
            shutil.copytree(
                os.path.join(folders["cpu"], "result"), os.path.join(folders["cpu_models_on_gpu"], "result")
            )
            shutil.copytree(os.path.join(folders["cpu"], "log"), os.path.join(folders["cpu_models_on_gpu"], "log"))
        ok_inf, t_inf, inference = (
            self.chain(folders["cpu_models_on_gpu"], gpu, ("attack",)) if ok_cpu else (False, 0, {})
        )
        other = "CPU" if self.dry else "CUDA"
        table = [f"{'number':<24}{'CPU':>10}{other:>10}{'CPU models, ' + other:>22}"]
        for key in cpu:
            table.append(
                f"{key:<24}{cpu[key]:>10.3f}{on_gpu.get(key, float('nan')):>10.3f}"
                f"{inference.get(key, float('nan')):>22.3f}"
            )
        with open(os.path.join(self.out, "agreement.txt"), "w") as f:
            f.write("\n".join(table) + "\n")
        print("\n".join("   " + line for line in table), flush=True)
        train_diff = max_diff(cpu, on_gpu)
        self.row(
            f"agreement training (CPU vs {other})",
            ok_cpu and ok_gpu and set(cpu) == set(on_gpu),
            t_cpu + t_gpu,
            f"largest difference {train_diff:.3f} points (each device draws its own numbers; see agreement.txt)",
        )
        attacked = {k: v for k, v in cpu.items() if not k.startswith("victim iter")}
        inf_diff = max_diff(attacked, inference)
        # Same models, so only float reordering separates them; the attack models (SAMIA, NN) also train on
        # device-specific random numbers, so the tight bound holds for the deterministic attacks.
        deterministic = {n for name in ("threshold", "lira", "rmia") if name in ATTACKS for n in ATTACKS[name].reports}
        det_diff = max_diff({k: v for k, v in attacked.items() if k in deterministic | {"pruned"}}, inference)
        self.row(
            f"agreement inference (CPU models on {other})",
            ok_inf and det_diff <= 0.1 and set(attacked) <= set(inference),
            t_inf,
            f"pruned accuracy and {', '.join(sorted(deterministic))}: largest difference {det_diff:.3f} "
            f"points (pass: <= 0.1); all attacks: {inf_diff:.3f}",
        )

    # ------------------------------------------------------------ 4. the main job

    def grid(self):
        path = os.path.join("grids", "digits.json")
        if self.dry:  # the same grid, smallest settings
            with open(path) as f:
                grid = json.load(f)
            grid["overrides"] = {
                "pretrain": {"epochs": 1},
                "prune": {"prune_epochs": 1},
                "attack": {"attack_epochs": 1},
            }
            grid["prune_iter"] = 2
            path = os.path.join(self.out, "grid_digits_tiny.json")
            with open(path, "w") as f:
                json.dump(grid, f, indent=1)
        for folder in ("result", "log"):
            shutil.rmtree(folder, ignore_errors=True)
        flags = self.sizes.grid_flags + ([] if self.dry else ["2"])
        start = time.monotonic()
        code, text = run(["grid.py", path, *flags], self.out, "grid_digits", self.sizes.timeout)
        seconds = time.monotonic() - start
        steps = expand(Grid(path, path))
        records = [read_json(s.record) for s in steps]
        done = [r for r in records if r]
        gpu_lines = sorted({line for s in steps for line in last_block(s.log, "") if line.startswith("GPU: ")})
        packed = most_at_once(done)
        note = f"{len(done)}/{len(steps)} steps in {seconds:.0f} s, up to {packed} at once; " + (
            gpu_lines[0] if gpu_lines else "no GPU line (CPU)"
        )
        self.row(
            f"grid {' '.join(flags)}",
            code == 0 and len(done) == len(steps) and (self.dry or bool(gpu_lines)),
            seconds,
            note,
        )

    def summary(self):
        head = "CPU dry run" if self.dry else device_name()
        lines = [f"GPU check summary ({head})", f"{'item':<44}{'result':<8}{'seconds':>9}  number"]
        for item, result, seconds, note in self.rows:
            lines.append(f"{item:<44}{result:<8}{'-' if seconds is None else f'{seconds:.1f}':>9}  {note}")
        failed = sum(r[1] == "FAIL" for r in self.rows)
        lines.append(f"{len(self.rows) - failed} passed, {failed} failed")
        text = "\n".join(lines)
        with open(os.path.join(self.out, "summary.txt"), "w") as f:
            f.write(text + "\n")
        print("\n" + text, flush=True)
        return failed


def step_defense(step):
    """The --defend of a step's command ('base' without one)."""
    return step.argv[step.argv.index("--defend") + 1] if "--defend" in step.argv else "base"


def read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def max_diff(a, b):
    common = [k for k in a if k in b]
    return max((abs(a[k] - b[k]) for k in common), default=float("nan"))


def most_at_once(records):
    """The largest number of steps whose [start, end) overlap, from their job records."""
    from datetime import datetime

    events = sorted(
        [(datetime.fromisoformat(r["start"]), 1) for r in records]
        + [(datetime.fromisoformat(r["end"]), -1) for r in records],
        key=lambda e: (e[0], e[1]),
    )
    most = running = 0
    for _, change in events:
        running += change
        most = max(most, running)
    return most


def copy_code(folder, out):
    """The code and configs of this folder into folder, without results, logs or this check's output: a chain run
    there has result/ and log/ of its own."""
    skip = {"result", "log", "data", ".git", "runs", os.path.basename(out)}
    shutil.copytree(".", folder, ignore=lambda d, names: [n for n in names if os.path.samefile(d, ".") and n in skip])


def device_name():
    import torch

    return (
        f"{torch.cuda.get_device_name(0)} | torch {torch.__version__} | CUDA {torch.version.cuda}"
        if torch.cuda.is_available()
        else "no CUDA"
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--cpu-dry-run",
        dest="dry",
        action="store_true",
        help="the same items on the CPU with the smallest settings (what CI runs)",
    )
    parser.add_argument("--out", default="gpu_check", help="folder for the logs and summary.txt")
    args = parser.parse_args()
    if not args.dry:
        import torch

        if not torch.cuda.is_available():
            print("error: no CUDA GPU here; run with --cpu-dry-run to check the script on the CPU", file=sys.stderr)
            sys.exit(2)
    os.makedirs(args.out, exist_ok=True)
    check = Check(os.path.abspath(args.out), args.dry)
    for item in (check.defenses, check.models, check.agreement, check.grid):
        try:
            item()
        except Exception as err:  # one item's bug must not hide the others' results
            check.row(item.__name__, False, None, f"{type(err).__name__}: {err}")
    sys.exit(1 if check.summary() else 0)


if __name__ == "__main__":
    main()
