"""The audit's plan (docs/audit.md): which pool rows are audited (inserted canaries or the top mem-score rows),
the labels the models train with, which models train on which rows, the seeds of every model, and Feldman's
mem-score estimate from the audited models themselves.

The pool is the dataset's own training set (datasets.get_dataset), rows 0..N-1 of the index space that
splits.py uses (training rows first, then test rows), so row i is also row i of the mem-score CSVs. The test
set's rows are cut 34/66 into dev rows (best-epoch selection, as the scripts' own split does) and test rows
(the reported test accuracy), with train_test_split(test_size=0.66, random_state=seed).

Every random draw comes from its own numpy stream, default_rng([seed, stream, ...]) (STREAMS), so the
canaries do not move when M changes, the tuning models' halves never share a draw with the audited models',
and model m's seeds do not depend on the group it trains in.
"""

import os
from collections import namedtuple

import numpy as np
from sklearn.model_selection import train_test_split

from common import MissingError, UsageError, read_npz, save_npz
from defenses import get_defense

STREAMS = {"canaries": 0, "membership": 1, "init": 2, "shuffle": 3, "prune": 4, "tuning": 5}
TUNING_OFFSET = 1_000_000  # tuning model j uses the model seeds of model TUNING_OFFSET + j: never an audited one
DEV_SHARE = 0.34  # of the test set's rows, as splits.py cuts its dev/test pool 34/66
FORMAT = 1


def stream(seed: int, name: str, *more: int) -> np.random.Generator:
    return np.random.default_rng([seed, STREAMS[name], *more])


def model_seed(seed: int, name: str, model: int) -> int:
    """A 32-bit seed for model `model`'s draws of kind `name` (init, shuffle, prune): independent of the group."""
    return int(np.random.SeedSequence([seed, STREAMS[name], model]).generate_state(1)[0])


def insert_canaries(labels: np.ndarray, k: int, num_cls: int, seed: int) -> tuple:
    """(rows, new labels): k distinct rows drawn uniformly from the pool, each relabelled with a wrong label
    drawn uniformly from the other num_cls - 1 classes (draw j in 0..num_cls-2 is the j-th other class in
    ascending order). Only those rows change. rows are sorted."""
    rng = stream(seed, "canaries")
    rows = np.sort(rng.choice(len(labels), size=k, replace=False)).astype(np.int64)
    j = rng.integers(0, num_cls - 1, size=k)
    new = np.array(labels, dtype=np.int64, copy=True)
    new[rows] = j + (j >= new[rows])  # skip the true label: the j-th of the others
    return rows, new


def membership(models: int, n: int, seed: int, name: str = "membership") -> np.ndarray:
    """(models, n) bool: model m trains on exactly n // 2 rows, its own uniform draw (a permutation's first
    half), so every row is IN for about half of the models, independently across models."""
    rng = stream(seed, name)
    member = np.zeros((models, n), dtype=bool)
    for m in range(models):
        member[m, rng.permutation(n)[: n // 2]] = True
    return member


def feldman_memscores(correct: np.ndarray, member: np.ndarray) -> tuple:
    """(mem-scores, rows without an IN or an OUT model): mem_i = Pr[correct on i | i IN] - Pr[correct on i | i
    OUT] over the models (Feldman & Zhang 2020), correct and member (models, n) bool. A row that no model (or
    every model) trained on has no estimate; it gets 0."""
    correct, member = np.asarray(correct, bool), np.asarray(member, bool)
    ins, outs = member.sum(0), (~member).sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        score = (correct & member).sum(0) / ins - (correct & ~member).sum(0) / outs
    lacking = (ins == 0) | (outs == 0)
    return np.where(lacking, 0.0, score).astype(np.float64), int(lacking.sum())


def dev_test_rows(n_train: int, n_test: int, seed: int) -> tuple:
    """(dev rows, test rows) of the index space: the test set's rows cut 34/66."""
    rows = n_train + np.arange(n_test)
    dev, test = train_test_split(rows, test_size=1 - DEV_SHARE, random_state=seed)
    return np.sort(dev).astype(np.int64), np.sort(test).astype(np.int64)


def default_canaries(models: int, n: int) -> int:
    """The smallest K whose expected non-member canary decisions, models * K / 2, reach 1100: TPR@1%FPR needs
    1000 (intervals.measurable), and the draw moves the count by a few percent. At most n // 4."""
    return min(-(-2200 // models), n // 4)


class Plan:
    """The plan file (<audit>/plan.npz, no pickle): arrays and meta (strings and ints)."""

    ARRAYS = ("member", "labels", "true_labels", "audited", "dev", "test")

    def __init__(self, arrays: dict, meta: dict):
        self.arrays, self.meta = arrays, meta

    def __getattr__(self, name):
        if name in Plan.ARRAYS:
            return self.arrays[name]
        raise AttributeError(name)

    @property
    def models(self) -> int:
        return int(self.meta["models"])

    @property
    def n(self) -> int:
        return int(self.meta["n_train"])

    @classmethod
    def create(cls, true_labels, n_test, num_cls, models, seed, canaries=None, top_rows=None, **meta) -> "Plan":
        """Canaries (canaries=K) or the given top mem-score rows (top_rows) as the audited rows."""
        n = len(true_labels)
        if top_rows is not None:
            audited, labels, mode = (
                np.sort(np.asarray(top_rows, dtype=np.int64)),
                np.asarray(true_labels),
                "top_memscore",
            )
        else:
            (audited, labels), mode = insert_canaries(true_labels, canaries, num_cls, seed), "canaries"
        dev, test = dev_test_rows(n, n_test, seed)
        arrays = {
            "member": membership(models, n, seed),
            "labels": np.asarray(labels, dtype=np.int64),
            "true_labels": np.asarray(true_labels, dtype=np.int64),
            "audited": audited,
            "dev": dev,
            "test": test,
        }
        meta = {"format": FORMAT, "mode": mode, "models": models, "seed": seed, "n_train": n, "n_test": n_test, **meta}
        return cls(arrays, meta)

    def save(self, path: str) -> None:
        save_npz(path, self.arrays, self.meta)

    @classmethod
    def load(cls, path: str, prepare: str) -> "Plan":
        """prepare: the command that makes the plan (python audit.py prepare GPU-ID CONFIG), for the errors."""
        if not os.path.isfile(path):
            raise MissingError(f"audit plan {path} not found; run {prepare} first")
        # prepare is seeded and np.savez writes no time stamps: the same options give the same file, so the
        # models trained on the lost plan stay valid
        fix = (
            f"delete it and rebuild it with: {prepare} --models M and the --canaries K or --audit_top_memscore K "
            "it was made with (the same options make the same file)"
        )
        try:
            arrays, meta = read_npz(path)
        except Exception as err:
            raise broken_file(path, "the audit plan", f"unreadable ({error_text(err)})", fix)
        if meta.get("format") != FORMAT or not set(Plan.ARRAYS) <= set(arrays):
            raise broken_file(path, "the audit plan", "not written by this audit.py", fix)
        return cls(arrays, meta)


def broken_file(path: str, what: str, problem: str, fix: str) -> MissingError:
    """The one error line for a file a step wrote and a later one cannot use: '<path> (<what>): <problem>; <fix>'."""
    return MissingError(f"{path} ({what}): {problem}; {fix}")


def error_text(err: Exception) -> str:
    """'<type>: <the first line of its message>', what went wrong in reading a file."""
    lines = str(err).splitlines()
    return type(err).__name__ + (f": {lines[0]}" if lines else "")


# ---------------------------------------------------------------- the steps in order (audit.py all, grid.py)

AuditStep = namedtuple("AuditStep", "name argv needs")


DEFENSE_FLAGS = ("defend_arg", "stride", "width", "weight_decay_mem", "mem_thre", "dp_microbatch", "semantics", "tag")


def parse_defense(spec: str) -> dict:
    """'slide_re:stride=1,width=5' -> {'defend': 'slide_re', 'stride': '1', 'width': '5'}; 'slide_re:tuned' ->
    {'defend': 'slide_re', 'tuned': True}: the setting audit.py tune chooses (a tune step before its prunes)."""
    name, _, rest = spec.partition(":")
    entry = {"defend": get_defense(name.strip()).name}
    for item in filter(None, (i.strip() for i in rest.split(","))):
        key, eq, value = item.partition("=")
        if item == "tuned" and get_defense(entry["defend"]).search_space:
            entry["tuned"] = True
        elif key in {k.flag for k in get_defense(entry["defend"]).search_space} and "tuned" in rest.split(","):
            raise UsageError(f"--defense {spec}: '{key}' is what tuned chooses; give one of them, not both")
        elif not eq or key not in DEFENSE_FLAGS:
            raise UsageError(
                f"--defense {spec}: '{item}' is not flag=value with a flag of {', '.join(DEFENSE_FLAGS)}, or 'tuned' "
                f"(a defense with a search space)"
            )
        else:
            entry[key] = value
    return entry


def audit_steps(
    config,
    gpu="GPU-ID",
    models=32,
    group_size=8,
    audited=(),
    defenses=({"defend": "base"},),
    pruning=(),
    with_dp=False,
    attack=(),
    common=(),
    out=None,
    tune=(),
    control=False,
    tune_workers=1,
) -> list:
    """Every step's argv (after "python") in dependency order, each with the names of the steps it needs:
    prepare; pretrain per group; memscore; attack --original; per defense entry ({defend, flag: value}) prune per
    group and its attack; with_dp: the DP-SGD baseline, dp tuned as every defense (as DP-SGD is trained with
    --semantics corrected: tune.base.corrected, tune.dp, prune dp per group, attack dp); summarize. audited:
    prepare's flags (--canaries K ...); pruning: the pruning flags of every prune, attack and tune; attack: the
    attack flags; common: flags of every step (--seed, --audit_tag, config overrides, --quiet); tune: the tune
    steps' own (--trials, --tuning_models, --target_acc ...). An entry with tuned: True gets a tune step before its
    prunes, after tune.base (once, after prepare: the tuning models and the Base reference, which the tune steps
    share); with tune_workers W > 1, its trials run in W steps tune.<name>.w<k> (--worker k/W), and tune.<name>
    chooses after them. control: the fine-tuning control, Base at sparsity 0 with the same schedule (stage
    <pruner>_0.0)."""
    common, pruning = list(common), list(pruning)
    groups = range(-(-models // group_size))
    step = lambda name, *flags: ["audit.py", name, gpu, config, *flags, *common]
    by_group = lambda g: ["--group", str(g), "--group_size", str(group_size)]
    steps = [AuditStep("prepare", step("prepare", "--models", str(models), *audited), [])]
    pretrain_steps = [AuditStep(f"pretrain.g{g}", step("pretrain", *by_group(g)), ["prepare"]) for g in groups]
    steps += pretrain_steps
    pretrained = [s.name for s in pretrain_steps]
    steps.append(AuditStep("memscore", step("memscore"), pretrained))
    steps.append(AuditStep("attack.unpruned", step("attack", "--original", *attack), pretrained))
    entries = [dict(e) for e in defenses]

    def add(entry, name, extra_needs):
        flags = [f for k, v in entry.items() for f in ((f"--{k}",) if v is True else (f"--{k}", str(v)))]
        if entry.get("tuned") and "--tuning_models" in tune:  # prune and attack read the study of that many
            flags += tune[tune.index("--tuning_models") : tune.index("--tuning_models") + 2]
        if entry.get("tuned"):  # on the tuning models, which tune.base trains: no audited model
            semantics = ["--semantics", entry["semantics"]] if "semantics" in entry else []
            base = "tune.base" + (f".{entry['semantics']}" if semantics else "")  # one Base reference per semantics
            if not any(s.name == base for s in steps):
                first = [s.name for s in steps if s.name.startswith("tune.base")][:1]  # trains the tuning models
                tuning_base = step("tune", "--defend", "base", *pruning, *semantics, *tune)
                steps.append(AuditStep(base, tuning_base, first or ["prepare"]))
            tuning = step("tune", "--defend", entry["defend"], *pruning, *semantics, *tune)
            workers = [
                AuditStep(f"tune.{name}.w{k}", [*tuning, "--worker", f"{k}/{tune_workers}"], [base])
                for k in range(1, tune_workers + 1)
                if tune_workers > 1
            ]
            steps.extend(workers)
            steps.append(AuditStep(f"tune.{name}", tuning, [w.name for w in workers] or [base]))
            extra_needs = [*extra_needs, f"tune.{name}"]
        prunes = [
            AuditStep(f"prune.{name}.g{g}", step("prune", *by_group(g), *pruning, *flags), ["memscore", *extra_needs])
            for g in groups
        ]
        attack_step = AuditStep(f"attack.{name}", step("attack", *pruning, *flags, *attack), [p.name for p in prunes])
        steps.extend(prunes + [attack_step])
        return attack_step.name

    for i, entry in enumerate(entries):
        label = "_".join([entry["defend"]] + [k if v is True else f"{k}{v}" for k, v in entry.items() if k != "defend"])
        add(entry, f"{i}.{label}", [])
    if control:  # after the entries: its --prune_sparsity follows (and overrides) the pruning flags
        add({"defend": "base", "prune_sparsity": 0.0}, "control", [])
    dp = {"defend": "dp", "semantics": "corrected", "tuned": True}
    if with_dp and dp not in entries:  # given as an entry too: one stage, one run
        add(dp, "dp", [])
    summary = step("summarize") + (["--out", out] if out else [])
    steps.append(AuditStep("summarize", summary, [s.name for s in steps if s.name.startswith("attack.")]))
    return steps
