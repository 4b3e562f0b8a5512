"""The results table: every prune and attack run as one row, from the run records and the logs.

Reads the run records RESULT_DIR/<dataset>_<model>/records/*.json (records.py) and the logs
LOG_DIR/<dataset>_<model>/<pruner>_<sparsity>_<defend>.txt in the format of docs/results.md
(the release's own logs too). A record and its log block are one run, one row: every record names its
log file and the byte offset where its block starts, the logs are parsed with those offsets, and a block
that a record names takes the record's values; a record whose block is in no log under LOG_DIR gives a
row of its own, and a block without a record is read from the log alone. The table holds one row per
configuration (KEY), merged from all its runs: each attack's newest result, the newest of everything else.
Each row has a status (run_status): ok, "failed: <why>" for a block closed by `Run ended early: <why>`, or
unfinished; a configuration's failed and unfinished runs are shown only while it has no run that is ok. A
setting whose attacks read a model that a later prune run replaced is STALE: the new model's numbers, no
attack's (newest_models_only).
"""

import math
import os
import re
from collections import namedtuple

import pandas as pd

from attacks import report_names
from defenses import DEFENSES
from paths import DEFAULT_SEED
from records import find_records, record_time

ATTACKS = report_names()  # the attacks' log names, in log order
METRICS = {"accuracy": "acc", "AUC": "auc", "TPR@1%FPR": "tpr1", "TPR@0.1%FPR": "tpr01"}
BOUNDS = ("lo", "hi")  # <attack>_<metric>_lo / _hi: the 95 % bootstrap interval from the run record
MODEL_COLUMNS = ["pretrained_acc", "pruned_acc", "defend_time_s", "dp_epsilon"]  # the pruned model's, not an attack's
STALE = "stale: pruned again after its attacks; rerun mia_modi.py for this setting (--all shows the earlier attacks)"
EXTRA = ("nonmembers", "scores")  # the columns after the attacks' (as far as any row has them)
ARG_DEFENSES = {name for name, cls in DEFENSES.items() if cls.arg_in_name}  # defend_arg is in their names
KEY = [
    "dataset",
    "model",
    "pruner",
    "sparsity",
    "defense",
    "defend_arg",
    "window",
    "weight_decay_mem",
    "setting",
    "semantics",
    "tag",
    "seed",
]
COLUMNS = KEY + ["pretrained_acc", "pruned_acc", "defend_time_s", "dp_epsilon", "status"]
TEXT_COLUMNS = (
    "dataset",
    "model",
    "pruner",
    "defense",
    "window",
    "setting",
    "semantics",
    "tag",
    "seed",
    "scores",
    "status",
)  # not floats

NUM = r"([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|nan|inf)"
FILE_RE = re.compile(r"^(.+?)_(\d*\.?\d+)(?:_(.*?))?(?:_tag-([A-Za-z0-9.-]+))?$")
FOLDER_RE = re.compile(r"^([^_]+)_(.+?)(?:_seed(\d+))?$")  # <ds>_<model>[_seed<k>]
# Lines are matched anywhere, so the release's "2024-01-01 ... - INFO - " prefixes do not matter.
ATTACK_RE = re.compile(r"(?<![\w-])([A-Za-z][\w-]*) attack (accuracy|AUC|TPR@1%FPR|TPR@0\.1%FPR): " + NUM)
# The release's NN lines: "NN attack accuracy 61.200", "Top3-NN Attack Accuracy 61.2" (no colon).
RELEASE_ACC_RE = re.compile(r"(?<![\w-])([A-Za-z][\w-]*) (?:attack accuracy|Attack Accuracy) " + NUM)
VICTIM_RE = re.compile(r"Victim (pruned|original) model test accuracy: " + NUM)
SHADOWS_RE = re.compile(r"Shadows: (.*)$")
SEMANTICS_RE = re.compile(r"Semantics: (\w+)")
PRETRAINED_RE = re.compile(r"Pretrained Victim: Accuracy " + NUM)
DEFEND_TIME_RE = re.compile(r"Total \S+ defend time: " + NUM + "s")
EPSILON_RE = re.compile(r"DP epsilon: " + NUM)
SCORES_RE = re.compile(r"Scores: (\S+\.npz)\s*$")
SHADOW_ITER_RE = re.compile(r"shadow \d+ iter \d+ best model")
ENDED_RE = re.compile(r"Run ended early: (.*?)\s*$")  # common.RunLog's last line of a run that failed


def header_re(pruner):
    # <ds>_<model>_<pruner>_<sparsity>[_<defend>[_<arg>]][_<stride>-<width>]_<weight_decay_mem>
    return re.compile(r"(?:^|\s)\S+_" + re.escape(pruner) + r"_\d*\.?\d+(?:_(\S+?))?_" + NUM + r"\s*$")


def parse_header(match, defense):
    info = {"weight_decay_mem": float(match.group(2))}
    for token in (match.group(1) or "").split("_"):
        if re.fullmatch(r"\d+-\d+", token):
            info["window"] = token
        elif defense in ARG_DEFENSES and re.fullmatch(NUM, token):
            info["defend_arg"] = float(token)
    return info


def unpruned_under_defense(setting, defense):
    """An --original attack logged under a defense (older versions took --original --defend X): it attacked the
    unpruned models, which no defense touched, so it is no run of that defense (fix_setting)."""
    return setting == "original" and defense not in ("base", None)


def fix_setting(row):
    """What an attack of an older version was, whatever flags it took: --adaptive on Base used the Base-pruned
    shadows (the base setting), and --original under a defense is the unpruned model's Base row, without the
    defense's argument, window and prune numbers."""
    if row.get("setting") == "adaptive" and row.get("defense") == "base":
        row["setting"] = "base"
    elif unpruned_under_defense(row.get("setting"), row.get("defense")):
        row.update(defense="base", defend_arg=math.nan, window=math.nan, defend_time_s=math.nan, dp_epsilon=math.nan)


def shadow_setting(text):
    """The setting named by a "Shadows: ..." line."""
    text = text.strip()
    return (
        "original"
        if text == "original"
        else "adaptive"
        if text.endswith("(adaptive)")
        else "base"
        if text.endswith("(base)")
        else "unknown"
    )


class Block:
    """One prune run (header, pretrained accuracy, defend time, epsilon) and the attack runs logged after it."""

    def __init__(self, info=None, offset=None):
        self.info, self.attacks = dict(info or {}), []
        self.in_shadows, self.late_eps = False, None
        self.offset = offset  # byte offset of its header line in the log (None: a block without one)

    def new_attack(self, setting="unknown", offset=None):
        self.attacks.append({"setting": setting, "_attack_at": offset})
        return self.attacks[-1]

    def rows(self, config):
        """Raw rows, one per attack, and one of the prune run alone when no attack is on its models (none yet,
        or only --original ones under a defense, which are Base rows: fix_setting). They still carry
        victim_acc and the offsets _prune_at/_attack_at (see finish_row)."""
        info = dict(self.info)
        if "dp_epsilon" not in info and self.late_eps is not None:
            info["dp_epsilon"] = self.late_eps
        attacks = list(self.attacks)
        if not attacks or (info and all(unpruned_under_defense(a["setting"], config["defense"]) for a in attacks)):
            attacks.insert(0, {"setting": None, "_attack_at": None, **{k: info.get(k) for k in ("_ended", "_ours")}})
        for attack in attacks:  # a row's _ended and _ours are its own run's: the attack's, or the prune's alone
            yield {**config, **info, "_ended": None, "_ours": None, **attack, "_prune_at": self.offset}


def finish_row(row):
    """The victim's accuracy is the pruned model's, or with --original the pretrained one's; the setting is
    what the attack was (fix_setting)."""
    victim_acc = row.pop("victim_acc", math.nan)
    fix_setting(row)
    row["pretrained_acc" if row["setting"] == "original" else "pruned_acc"] = victim_acc
    return row


class LogReader:
    """Folds the lines of one log file into Blocks; one method per kind of line."""

    def __init__(self, defense, find_header):
        self.defense, self.find_header = defense, find_header
        self.blocks, self.attack = [], None
        self.offset = None  # byte offset of the line being fed

    def block(self):
        """The current block, opened on the first line that needs one (a log without a header line)."""
        if not self.blocks:
            self.blocks.append(Block())
        return self.blocks[-1]

    def feed(self, line):
        for pattern, handle in (
            (ENDED_RE, self.on_ended),
            (ATTACK_RE, self.on_attack_metric),
            (RELEASE_ACC_RE, self.on_release_accuracy),
            (VICTIM_RE, self.on_victim),
            (SHADOWS_RE, self.on_shadows),
            (SCORES_RE, self.on_scores),
            (SEMANTICS_RE, self.on_semantics),
            (PRETRAINED_RE, self.on_pretrained),
            (DEFEND_TIME_RE, self.on_defend_time),
            (EPSILON_RE, self.on_epsilon),
            (SHADOW_ITER_RE, self.on_shadow_iteration),
            (self.find_header, self.on_header),
        ):
            if m := pattern.search(line):
                handle(m)
                return

    def add_metric(self, name, metric, value):
        column = f"{name}_{METRICS[metric]}"
        if self.attack is None or column in self.attack:  # a repeated metric starts a new run
            self.attack = self.block().new_attack()
        self.attack[column] = value

    def on_attack_metric(self, m):
        self.add_metric(m.group(1), m.group(2), float(m.group(3)))

    def on_release_accuracy(self, m):
        self.add_metric(m.group(1), "accuracy", float(m.group(2)))

    def on_victim(self, m):
        self.attack = self.block().new_attack("original" if m.group(1) == "original" else "unknown", self.offset)
        self.attack["victim_acc"] = float(m.group(2))

    def on_shadows(self, m):
        self.attack = self.attack or self.block().new_attack()
        self.attack["setting"] = shadow_setting(m.group(1))

    def on_scores(self, m):
        if self.attack is not None:
            self.attack["scores"] = m.group(1)

    def on_semantics(self, m):
        # It follows the prune header (no attack open: the block's) or the "Shadows:" line (that attack's).
        target = self.block().info if self.attack is None else self.attack
        target["semantics"] = m.group(1)
        target["_ours"] = True  # written by this code, which also writes a record or "Run ended early" at the end

    def on_ended(self, m):
        # The run that ended early is the attack open (its block starts at "Victim ..."), else the prune run.
        target = self.block().info if self.attack is None else self.attack
        target["_ended"] = m.group(1)
        self.attack = None

    def on_pretrained(self, m):
        block = self.blocks[-1] if self.blocks else None
        if block is None or "pretrained_acc" in block.info or block.attacks:
            self.blocks.append(Block())  # a run without a header line
        self.blocks[-1].info["pretrained_acc"] = float(m.group(1))
        self.attack = None

    def on_defend_time(self, m):
        self.block().info["defend_time_s"] = float(m.group(1))

    def on_epsilon(self, m):
        # The victim's epsilon is the last one before the shadows train; later ones are a fallback.
        block = self.block()
        if block.in_shadows:
            block.late_eps = float(m.group(1))
        else:
            block.info["dp_epsilon"] = float(m.group(1))

    def on_shadow_iteration(self, m):
        if self.blocks:
            self.blocks[-1].in_shadows = True

    def on_header(self, m):
        self.blocks.append(Block(parse_header(m, self.defense), self.offset))
        self.attack = None


def parse_file(path: str, dataset: str, model: str, seed: int = DEFAULT_SEED) -> list:
    """Raw rows of one log file (Block.rows), oldest first: one per attack block, or one per prune block
    without any."""
    pruner, sparsity, defense, tag = FILE_RE.match(os.path.basename(path)[:-4]).groups()
    config = {
        "dataset": dataset,
        "model": model,
        "pruner": pruner,
        "sparsity": float(sparsity),
        "defense": defense or "base",  # the release writes Base as an empty defend
        "semantics": "release",  # the release's logs have no "Semantics:" lines
        "tag": tag or "",
        "seed": seed,
    }
    reader = LogReader(config["defense"], header_re(pruner))
    with open(path, "rb") as f:
        reader.offset = 0
        for line in f:  # lines end at b"\n" (the records' offsets point there); old logs may hold \r too
            for piece in re.split(r"\r\n?|\n", line.decode(errors="replace")):
                reader.feed(piece)
            reader.offset += len(line)
    return [row for block in reader.blocks for row in block.rows(config)]


def log_files(log_dir: str, problems: list = None) -> list:
    """(path, dataset, model, seed) of every results log, oldest modification first; each .txt file left out
    (but pretrain.txt) is named in problems as "<file>: <why>"."""
    found, problems = [], [] if problems is None else problems
    for folder in sorted(os.listdir(log_dir)) if os.path.isdir(log_dir) else []:
        sub = os.path.join(log_dir, folder)
        if folder == "tb" or not os.path.isdir(sub):
            continue
        dataset, model, seed = FOLDER_RE.match(folder).groups() if FOLDER_RE.match(folder) else (folder, "", None)
        seed = int(seed) if seed else DEFAULT_SEED
        for name in sorted(os.listdir(sub)):
            path = os.path.join(sub, name)
            if not name.endswith(".txt") or name == "pretrain.txt":
                continue
            if not os.path.isfile(path):
                problems.append(f"{path}: {'a folder' if os.path.isdir(path) else 'a broken link'}, not a log file")
                continue
            if not FILE_RE.match(name[:-4]):
                problems.append(f"{path}: name is not <pruner>_<sparsity>_<defend>.txt")
                continue
            found.append((path, dataset, model, seed))
    return sorted(found, key=lambda item: os.path.getmtime(item[0]))  # stable: ties keep name order


# ---------------------------------------------------------------- records

RUN_FIELDS = (
    "dataset",
    "model",
    "pruner",
    "sparsity",
    "defense",
    "defend_arg",
    "window",
    "weight_decay_mem",
    "semantics",
    "tag",
    "seed",
)


def value(x):
    """A record's number as a float (null -> nan; the strings "nan", "inf" -> floats)."""
    return math.nan if x is None else float(x)


def run_fields(record):
    """The columns that name the run, from the record's "run". An attack's name its pruned victim; the
    window and weight_decay_mem are the prune run's (an attack's own flags need not hold them)."""
    run = record["run"]
    out = {key: run[key] for key in RUN_FIELDS if key in run}
    out.update(
        sparsity=float(run["sparsity"]),
        defend_arg=value(run.get("defend_arg")),
        seed=int(run["seed"]),
        window=run.get("window") or math.nan,
        weight_decay_mem=value(run.get("weight_decay_mem")),
    )
    if record["kind"] == "attack":
        out.update(window=math.nan, weight_decay_mem=math.nan)
    return out


def prune_fields(record):
    """A prune record's columns, as its log block would give them."""
    results = record["results"]
    return {
        **run_fields(record),
        "pretrained_acc": value(results["pretrained"]["accuracy"]),
        "defend_time_s": value(results["defend_time_s"]),
        "dp_epsilon": value(results.get("dp_epsilon")),
    }


def attack_fields(record):
    """An attack record's own columns (the rest comes from its prune run), as its log block would give them."""
    results = record["results"]
    out = {
        "setting": record["run"]["setting"],
        "semantics": record["run"]["semantics"],
        "victim_acc": value(results["victim_test_acc"]),
    }
    if record.get("scores"):
        out["scores"] = record["scores"]
    if "nonmembers" in results:
        out["nonmembers"] = value(results["nonmembers"])
    for attack in results["attacks"]:
        for metric, short in METRICS.items():
            if metric in attack:
                out[f"{attack['name']}_{short}"] = value(attack[metric])
            for bound, x in zip(BOUNDS, attack.get("intervals", {}).get(metric, ())):
                out[f"{attack['name']}_{short}_{bound}"] = value(x)
    return out


def log_key(path):
    """<ds>_<model>/<file>.txt: a log's name wherever its folder was copied to."""
    return tuple(path.replace("\\", "/").split("/")[-2:])


def usable_records(result_dir, problems):
    """The records under result_dir whose fields all read, each with its "fields" (its columns); the
    others are named in `problems`."""
    records, unreadable = find_records(result_dir) if result_dir else ([], [])
    problems += unreadable
    usable = []
    for record in records:
        try:
            record["fields"] = (prune_fields if record["kind"] == "prune" else attack_fields)(record)
            if record["kind"] == "attack":
                record["run_fields"] = run_fields(record)
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            problems.append(f"{record['file']}: a field is missing or damaged ({type(err).__name__}: {err})")
            continue
        usable.append(record)
    return usable


def record_rows(records, used):
    """(time, raw row) of every record whose block is in no log: an attack with the last prune run of its
    victim (same run name and prefix) that started before it, if any; then each prune record that no row
    holds yet (an --original attack under a defense holds none: its row is Base's, as from the logs)."""
    prunes = [r for r in records if r["kind"] == "prune"]
    victim = lambda r: (r["run"].get("run_name"), r["run"].get("prefix"))
    rows = []
    for attack in records:
        if attack["kind"] != "attack" or attack["file"] in used:
            continue
        earlier = [p for p in prunes if victim(p) == victim(attack) and record_time(p) <= record_time(attack)]
        prune = max(earlier, key=record_time) if earlier else None
        if prune is not None and not unpruned_under_defense(attack["run"]["setting"], attack["run"].get("defense")):
            used.add(prune["file"])
        rows.append(
            (
                record_time(attack),
                {
                    **attack["run_fields"],
                    **(prune["fields"] if prune else {}),
                    **attack["fields"],
                    "_model": f"run {prune['run_id']}" if prune else "",
                },
            )
        )
    rows += [
        (record_time(p), {**p["fields"], "setting": None, "_model": f"run {p['run_id']}"})
        for p in prunes
        if p["file"] not in used
    ]
    for _, row in rows:
        row["status"] = "ok"
    return rows


# ---------------------------------------------------------------- the table

Collected = namedtuple("Collected", "table records problems")


def collect(log_dir: str, result_dir: str = None, newest_only: bool = True) -> Collected:
    """Collected(table, records, problems): one DataFrame of all runs (with newest_only, one row per
    configuration: merge_runs), the usable records, and one line "<file>: <why>" per record or log file
    that could not be used (a log file in which no line of a run was found among them)."""
    problems = []
    records = usable_records(result_dir, problems)
    by_block = {(r["kind"], log_key(r["log"]["path"]), r["log"]["offset"]): r for r in records if r.get("log")}
    rows, used = [], set()
    for path, ds, model, seed in log_files(log_dir, problems):
        key = log_key(path)
        try:
            stat, parsed = os.stat(path), parse_file(path, ds, model, seed)
        except OSError as err:
            problems.append(f"{path}: cannot be read ({err.strerror or type(err).__name__})")
            continue
        if not parsed:  # not one line of a prune or attack run: garbage, or another program's text
            why = "empty" if stat.st_size == 0 else "no line of a prune or attack run in it"
            problems.append(f"{path}: {why} (the format is in docs/results.md)")
            continue
        mtime = stat.st_mtime
        for row in parsed:
            prune_at, attack_at, ended, ours = row["_prune_at"], row["_attack_at"], row.pop("_ended"), row.pop("_ours")
            found = {}
            for kind, at in (("prune", row.pop("_prune_at")), ("attack", row.pop("_attack_at"))):
                record = found[kind] = by_block.get((kind, key, at)) if at is not None else None
                if record is not None:  # the same run: the record's values win
                    row.update(record["fields"])
                    used.add(record["file"])
            own = found["attack" if attack_at is not None else "prune"]  # the record of the row's own run
            row["status"] = run_status(ended, own is not None, ours and not has_results(row, attack_at))
            prune = by_block.get(("prune", key, prune_at))
            row["_model"] = f"run {prune['run_id']}" if prune else f"log {'/'.join(key)}@{prune_at}"
            rows.append((mtime, row))
    rows += record_rows(records, used)
    rows = [finish_row(row) for _, row in sorted(rows, key=lambda item: item[0])]  # stable: ties keep order
    return Collected(table(rows, newest_only), records, problems)


def attack_name(col):
    """The attack of a column <attack>_<metric>[_lo|_hi]."""
    stem = col.rsplit("_", 1)[0]
    return stem.rsplit("_", 1)[0] if col.rsplit("_", 1)[-1] in BOUNDS else stem


def has_results(row, attack_at):
    """An attack row with an attack's metric, or a prune-only row with its defend time."""
    if attack_at is None and row.get("setting") is None:
        return "defend_time_s" in row
    return any(
        k.rsplit("_", 1)[-1] in METRICS.values()
        for k in row
        if k not in ("victim_acc", "pretrained_acc", "pruned_acc") and not k.startswith("_")
    )


def run_status(ended, recorded, empty):
    """ "ok"; "failed: <why>" for a run whose log block ends in "Run ended early: <why>"; "unfinished" for a
    block of ours (it has a "Semantics:" line) with neither that line, nor a record, nor any result: killed
    with SIGKILL, or still running. A block without a record that holds results (an older version's, or one
    killed after its results) is read as it is."""
    if recorded:
        return "ok"
    if ended is not None:
        return f"failed: {ended}"
    return "unfinished" if empty else "ok"


def attack_columns(columns):
    """{attack name: its metric columns} among a table's columns."""
    groups = {}
    for col in columns[len(COLUMNS) :]:
        if col not in EXTRA:
            groups.setdefault(attack_name(col), []).append(col)
    return groups


def merge_runs(df):
    """One row per configuration (KEY) from its rows, oldest first: each attack's columns from the newest row
    with a result of that attack, so that runs with different --attacks add up, and every other column
    (the victim's accuracy, the scores file, ...) its newest value."""
    ids = df.groupby(KEY, dropna=False, sort=False).ngroup()
    merged = df.groupby(ids).last()  # per column the newest value that is not missing
    for cols in attack_columns(df.columns).values():
        carried = df[cols].notna().any(axis=1)
        newest = df[carried].groupby(ids[carried]).tail(1)
        merged.loc[ids[newest.index].to_numpy(), cols] = newest[cols].to_numpy()
    return merged.reset_index(drop=True)


def newest_models_only(df):
    """The rows of each configuration (KEY) that attacked the model of its newest row: after a configuration
    was pruned again, the attacks on the model it replaced are not merged with those on the new one. An
    --original row's model is the pretrained one, whatever prune run its block follows. A prune run's row of
    its own (no setting: no attack on its models yet) goes once a later prune run of the same configuration
    (KEY but the setting) replaced its models: pruned again and attacked (a rerun, or a grid step retried
    after its driver was killed), the later run's rows hold the prune numbers the attacks read. A setting
    whose newest attack read a model that a later prune run replaced is one row of STALE (stale_rows), and
    the newest prune run's row of its own then goes: the stale rows hold its numbers with their setting."""
    model = df["_model"].where(df["setting"] != "original", "pretrained").fillna("")
    newest = model.groupby(df.groupby(KEY, dropna=False, sort=False).ngroup()).transform("last")
    pruned = df["_model"].where(df["setting"] != "original")  # the models of prune runs, oldest first
    config = df.groupby([key for key in KEY if key != "setting"], dropna=False, sort=False).ngroup()
    newest_pruned = pruned.groupby(config).transform("last")
    replaced = df["setting"].isna() & (df["_model"] != newest_pruned)
    kept = df[(model == newest) & ~replaced]
    stale = kept["setting"].notna() & (kept["setting"] != "original") & (kept["_model"] != newest_pruned[kept.index])
    if not stale.any():
        return kept
    own_row = kept["setting"].isna() & config[kept.index].isin(config[stale[stale].index])
    current = kept[~stale & (kept["setting"] != "original")]  # the rows of each configuration's newest model
    return pd.concat([kept[~stale & ~own_row], stale_rows(kept[stale], current, config)])


def stale_rows(attacked, current, config):
    """One row per configuration (KEY) of `attacked`, rows whose attacks read a model that a later prune run of
    their configuration replaced: its setting, the newest model's numbers (MODEL_COLUMNS, the newest value in
    `current`, that model's rows), no attack's numbers (they are the replaced model's) and the status STALE."""
    numbers = current.groupby(config[current.index])[MODEL_COLUMNS].last()  # per column the newest value
    rows = attacked.groupby(KEY, dropna=False, sort=False).tail(1)[KEY].copy()
    rows[MODEL_COLUMNS] = numbers.loc[config[rows.index]].to_numpy()
    rows["status"] = STALE
    return rows.reindex(columns=attacked.columns)


def table(rows, newest_only):
    df = pd.DataFrame(rows, columns=list(dict.fromkeys(COLUMNS + [k for r in rows for k in r] + ["_model"])))
    df = df.astype({c: float for c in df.columns if c not in TEXT_COLUMNS and c != "_model"})
    if newest_only and len(df):  # a configuration's failed runs show only while it has no run that is ok
        ok, config = df["status"] == "ok", [key for key in KEY if key != "setting"]
        df = df[ok | ~ok.groupby(df.groupby(config, dropna=False, sort=False).ngroup()).transform("any")]
        df = newest_models_only(df)
    df = df.drop(columns="_model")
    if newest_only and len(df):
        df = merge_runs(df)
    seen = set(attack_columns(df.columns))
    names = [a for a in ATTACKS if a in seen] + sorted(seen - set(ATTACKS))
    attack_cols = [
        f"{a}_{m}{bound}"
        for a in names
        for m in METRICS.values()
        for bound in ("", "_lo", "_hi")
        if f"{a}_{m}{bound}" in df.columns and df[f"{a}_{m}{bound}"].notna().any()
    ]
    extra = [c for c in EXTRA if c in df.columns and df[c].notna().any()]
    df = df[COLUMNS + attack_cols + extra]
    order = lambda col: col.where(col != "base", "") if col.name == "defense" else col  # Base first
    return df.sort_values(KEY, key=order, kind="stable", na_position="first").reset_index(drop=True)


def parse_logs(log_dir: str, newest_only: bool = True, result_dir: str = None) -> pd.DataFrame:
    """One DataFrame of all results (see collect)."""
    return collect(log_dir, result_dir, newest_only).table


def to_markdown(df: pd.DataFrame) -> str:
    cell = lambda v: "" if v is None or (isinstance(v, float) and math.isnan(v)) else str(v)
    lines = ["| " + " | ".join(df.columns) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)
