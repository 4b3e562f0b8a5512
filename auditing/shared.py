"""What the audit's steps (audit.py) share: the plan's data, model folders and their completion records, the
stages' records and scores, the audit's mem-scores, JSON files. Each function takes the step's AuditSettings
(auditing/settings.py) as `audit`."""

import dataclasses
import hashlib
import json
import os
import tempfile

import numpy as np
import torch

from auditing.plan import TUNING_OFFSET, Plan, broken_file, error_text, model_seed
from common import (
    MissingError,
    UsageError,
    atomic_write,
    remove_dead_temps,
    seed_everything,
    temp_prefix,
)
from datasets import TensorData, get_dataset
from memscores import read_memscores, read_sidecar, sidecar_path, train_sha256
from models import build_model
from paths import (
    AUDIT_PRETRAINED,
    checkpoint,
)
from progress import Progress
from prune_modi import prune_model
from splits import ModelSplit
from train import (
    completion_record,
    file_sha256,
    is_finished,
    load_model,
)


def audit_data(audit, plan: Plan, device) -> TensorData:
    """The pool (the dataset's training set, with the plan's training labels: canaries relabelled) then the test
    set, on device."""
    train, test = get_dataset(audit.flags.dataset_name)
    if (len(train), len(test)) != (plan.n, int(plan.meta["n_test"])) or train_sha256(train.x, train.y) != plan.meta[
        "data_sha256"
    ]:
        raise MissingError(
            f"the data of {audit.flags.dataset_name} is not the data the audit plan {audit.plan_path} was made for; "
            f"restore it, or delete {audit.folder} and start again from audit.py prepare"
        )
    labelled = TensorData(train.x, torch.from_numpy(plan.labels), train.mean, train.std)
    return TensorData.concat(labelled, test).to(device, amp=audit.flags.amp)


def model_split(plan: Plan, member: np.ndarray, device) -> ModelSplit:
    rows = lambda a: torch.from_numpy(np.asarray(a, dtype=np.int64)).to(device)
    return ModelSplit(rows(np.flatnonzero(member)), rows(plan.dev), rows(plan.test))


def group_models(audit, models: int) -> list:
    group, size = audit.flags.group, audit.flags.group_size
    first = group * size
    if first >= models:
        groups = -(-models // size)
        raise UsageError(
            f"--group {group} holds no model: {models} models in groups of {size} are groups 0..{groups - 1}"
        )
    return list(range(first, min(first + size, models)))


def groups_of(models: list, group_size: int) -> list:
    return sorted({m // group_size for m in models})


def finished(folder: str, plan_sha: str, info: dict) -> bool:
    """folder holds a finished model made from this plan with these settings."""
    if not is_finished(folder):
        return False
    record = completion_record(folder)
    return record.get("split_sha256") == plan_sha and all(record.get(k) == v for k, v in info.items())


def check_other_settings(folders: list, plan_sha: str, info: dict, fix: str) -> None:
    """A finished model of this stage made with other settings is not overwritten silently."""
    for folder in folders:
        record = completion_record(folder) if is_finished(folder) else None
        if record is not None and record.get("split_sha256") == plan_sha and not finished(folder, plan_sha, info):
            changed = sorted(k for k, v in info.items() if record.get(k) != v)
            raise UsageError(f"{folder} holds a model made with other settings ({', '.join(changed)}); {fix}")


def models_sha256(folders: list) -> str:
    """One hash of the checkpoints of a stage (from their completion records)."""
    return hashlib.sha256(" ".join(completion_record(f)["checkpoint_sha256"] for f in folders).encode()).hexdigest()


def require_finished(folders: list, plan_sha: str, info: dict, group_size: int, how) -> None:
    missing = [m for m, folder in enumerate(folders) if not finished(folder, plan_sha, info)]
    if missing:
        groups = groups_of(missing, group_size)
        raise MissingError(
            f"{len(missing)} of {len(folders)} models are not finished (e.g. {folders[missing[0]]}); {how(groups)}"
        )


def for_groups(groups) -> str:
    return f" for G in {', '.join(map(str, groups))}"


def pretrain_info(audit) -> dict:
    recipe = {k: getattr(audit.flags, k) for k in ("epochs", "optimizer", "lr", "weight_decay", "batch_size")}
    return {"stage": AUDIT_PRETRAINED, "recipe": {**recipe, "early_stop": audit.flags.early_stop_pretrain}}


PRETRAINED = {"stage": AUDIT_PRETRAINED}  # what later steps ask of a pretrained model (any recipe of this plan)


def pretrained_folders(audit, plan, tuning=False) -> list:
    count = audit.flags.tuning_models if tuning else plan.models
    return [audit.model_dir(AUDIT_PRETRAINED, m, tuning) for m in range(count)]


def require_pretrained(audit) -> list:
    plan, plan_sha = audit.plan
    folders = pretrained_folders(audit, plan)
    group_size = getattr(audit.flags, "group_size", 8)
    how = lambda groups: audit.again("pretrain", "--group", "G", "--group_size", str(group_size)) + for_groups(groups)
    require_finished(folders, plan_sha, PRETRAINED, group_size, how)
    return folders


def load_models(audit, folders, device) -> list:
    flags = audit.flags
    return [load_model(flags, checkpoint(f), device, "audit checkpoint", "rerun its audit.py step")[0] for f in folders]


def prune_info(audit, settings, memscore_sha) -> dict:
    return {
        "stage": audit.stage,
        "defense": audit.defense.name,
        "settings": dataclasses.asdict(settings),
        "pruning": {k: getattr(audit.flags, k) for k in ("pruner_name", "prune_sparsity", "prune_iter", "early_stop")},
        "memscore_sha256": memscore_sha,
    }


def load_json(path) -> tuple:
    """(the JSON object in path, None), or (None, what is wrong with it) when it holds none. An OSError (a
    missing file, no permission) is raised: rebuilding the file would not cure it."""
    try:
        with open(path, "rb") as f:
            value = json.loads(f.read().decode())
    except ValueError as err:  # not JSON, not UTF-8
        return None, f"unreadable ({error_text(err)})"
    if not isinstance(value, dict):
        return None, f"holds a JSON {type(value).__name__}, not an object"
    return value, None


def read_json(path, what: str, fix: str) -> dict:
    """The JSON object in path; else the error line naming the file, what is wrong and fix."""
    value, problem = load_json(path)
    if problem:
        raise broken_file(path, what, problem, fix)
    return value


RECORD_KEYS = ("stage", "defense", "scores", "attacks", "test_acc", "models", "audited", "attack_settings")


def read_attack_records(audit) -> list:
    """Every stage's attack record (records/<stage>.json), by file name; the error line for one that is
    unreadable or lacks a key that audit.csv's row reads."""
    folder = os.path.dirname(audit.record_path("x"))
    records = []
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        if name.endswith(".json") and not name.startswith(".tmp_"):
            path, stage = os.path.join(folder, name), name[: -len(".json")]
            record, problem = load_json(path)
            lacking = [k for k in RECORD_KEYS if k not in (record or {})]
            if problem is None and lacking:
                problem = f"lacks {', '.join(lacking)}"
            if problem:
                raise broken_file(path, f"the attack record of stage {stage}", problem, rebuild_attack(audit, stage))
            records.append(record)
    return records


def rebuild_attack(audit, stage: str, record: dict = None) -> str:
    """'rebuild it with: python audit.py attack ...': the flags the record says its attack ran with; without
    them (an unreadable or older record), --original for the unpruned stage, else the stage's own flags."""
    flags = (record or {}).get("flags")
    if isinstance(flags, list) and all(isinstance(f, str) for f in flags):
        return f"rebuild it with: {audit.command('attack', *flags, own_audit=False)}"
    if stage == AUDIT_PRETRAINED:
        return audit.rebuild("attack", "--original")
    return audit.rebuild("attack") + f" and the pruning and defense flags that made stage {stage}"


SCORE_ARRAYS = ("member", "audited", "score_LiRA", "score_RMIA")  # what summarize reads of a scores file


def read_scores(audit, record: dict) -> dict:
    """The SCORE_ARRAYS of a stage's scores file, which must be the file its attack wrote: its SHA-256 the one
    the record holds (a record older than that checksum: a file that loads); else the error line."""
    path, stage = record["scores"], record["stage"]
    what, fix = f"the audit scores of stage {stage}", rebuild_attack(audit, stage, record)
    if not os.path.isfile(path):
        raise broken_file(path, what, "not found", fix)
    if "scores_sha256" in record and file_sha256(path) != record["scores_sha256"]:
        written_by = audit.record_path(stage)
        raise broken_file(path, what, f"not the file its attack wrote (SHA-256 differs from {written_by}'s)", fix)
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in SCORE_ARRAYS}
    except Exception as err:  # truncated or not a zip, an array missing, a pickled array
        raise broken_file(path, what, f"unreadable ({error_text(err)})", fix)


def attack_stale(record_path: str, stamp: str, attack_settings: dict):
    """Why the attack record at record_path does not stand for this attack on these models with its scores file
    as written, or None when it does (the attack has nothing to do)."""
    record, problem = load_json(record_path)
    if problem:
        return f"its record {record_path} is {problem}"
    if record.get("models_sha256") != stamp or record.get("attack_settings") != attack_settings:
        return "the models or the attack settings changed"
    scores = record.get("scores")
    if not (isinstance(scores, str) and os.path.isfile(scores)):
        return f"its scores file {scores} is missing"
    if "scores_sha256" not in record:
        return f"its record {record_path} holds no checksum of its scores file (an older audit.py wrote it)"
    if record["scores_sha256"] != file_sha256(scores):
        return f"its scores file {scores} is not the file the attack wrote (SHA-256 differs from the record's)"
    return None


def write_json(path, record) -> None:
    text = json.dumps(record, indent=1, allow_nan=False) + "\n"
    atomic_write(path, lambda f: f.write(text.encode()))


def write_if_changed(path, content: bytes) -> bool:
    """Write content atomically unless the file already holds exactly it (a rerun changes no file)."""
    if os.path.isfile(path):
        with open(path, "rb") as f:
            if f.read() == content:
                return False
    atomic_write(path, lambda f: f.write(content))
    return True


class NullLog:
    def write(self, line):
        pass


def generators(seeds, device) -> list:
    return [torch.Generator(device=device).manual_seed(s) for s in seeds]


def build_models(audit, seeds, device) -> list:
    """Fresh models of the config's architecture, model i initialised under torch.manual_seed(seeds[i])."""
    flags, out = audit.flags, []
    for s in seeds:
        torch.manual_seed(s)
        out.append(build_model(flags.model_name, flags.num_cls, flags.input_dim).to(device))
    return out


def test_accuracy(logits, labels) -> np.ndarray:
    """(M,) accuracy % of each model's logits (M, n, C) on labels (n,)."""
    return 100.0 * (np.asarray(logits).argmax(2) == np.asarray(labels)[None]).mean(1)


def prune_flags_of(audit) -> list:
    """The flags that name this pruned stage, for the message that says how to make it."""
    given = audit.flags
    flags = ["--pruner_name", given.pruner_name, "--prune_sparsity", str(given.prune_sparsity)]
    flags += ["--prune_iter", str(given.prune_iter), "--defend", audit.defense.name]
    for flag in ("stride", "width"):
        if getattr(given, flag) is not None:
            flags += [f"--{flag}", str(getattr(given, flag))]
    if audit.defense.needs_memscore:
        flags += ["--mem_thre", str(given.mem_thre), "--weight_decay_mem", str(given.weight_decay_mem)]
    if given.semantics != "release":
        flags += ["--semantics", given.semantics]
    return flags + (["--tag", given.tag] if given.tag else [])


def memscore_current(path, stamp) -> bool:
    if not (os.path.isfile(path) and os.path.isfile(sidecar_path(path))):
        return False
    try:
        sidecar = read_sidecar(sidecar_path(path), "")
    except MissingError:
        return False
    return sidecar.get("models_sha256") == stamp and sidecar["csv_sha256"] == file_sha256(path)


def check_memscore_files(audit, path) -> None:
    """The memscore step's CSV and fingerprint as it wrote them (the CSV's SHA-256 the one the fingerprint
    holds); else the error line naming the file that is not."""
    fix = audit.rebuild("memscore")
    try:
        sidecar = read_sidecar(sidecar_path(path), "")
    except MissingError:
        raise broken_file(sidecar_path(path), "the audit's mem-score fingerprint", "missing or unreadable", fix)
    if file_sha256(path) != sidecar["csv_sha256"]:
        problem = f"not the file the memscore step wrote (SHA-256 differs from {sidecar_path(path)}'s)"
        raise broken_file(path, "the audit's mem-scores", problem, fix)


def read_audit_memscores(audit, data) -> tuple:
    """(mem-scores tensor, models stamp) written by the memscore step for the current pretrained models."""
    plan = audit.plan[0]
    path = audit.memscore_path
    stamp = models_sha256(require_pretrained(audit))
    fix = audit.rebuild("memscore")
    if not os.path.isfile(path):
        raise MissingError(f"the audit's mem-scores {path} not found; {audit.again('memscore')}")
    check_memscore_files(audit, path)
    if not memscore_current(path, stamp):
        raise broken_file(path, "the audit's mem-scores", "made from other pretrained models", fix)
    sidecar = read_sidecar(sidecar_path(path), fix)
    if sidecar["train_sha256"] != train_sha256(data.x[: plan.n], data.y[: plan.n]):
        raise MissingError(f"the audit's mem-scores {path} score another pool or other labels; {fix}")
    return read_memscores(path, plan.n, fix), stamp


def prune_tuning_models(audit, flags, defense, settings, data, sources, splits, memscores, scratch_name):
    """Prune each tuning model (sources[j] on splits[j]) under the defense with a trial's flags (audit.flags with
    its setting), as audit.py prune prunes a model, into a scratch folder that goes when the generator ends;
    yields (j, its best model, its iterations' history). A killed run's scratch folder (named with temp_prefix)
    goes with the next one's."""
    device = data.y.device
    remove_dead_temps(audit.folder)
    with tempfile.TemporaryDirectory(dir=audit.folder, prefix=temp_prefix(scratch_name)) as scratch:
        for j, source in enumerate(sources):
            seed_everything(model_seed(audit.flags.seed, "prune", TUNING_OFFSET + j))
            net = load_models(audit, [source], device)[0]
            target = os.path.join(scratch, f"model_{j}")
            os.makedirs(target)
            history = []
            tag = f"tuning {j}"
            prune_model(
                flags, net, defense, settings, data, splits[j], target, NullLog(), tag, memscores, Progress(), history
            )
            best = load_model(flags, checkpoint(target), device, "tuning checkpoint", f"rerun {scratch_name}")[0]
            yield j, best, history
