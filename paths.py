"""Every file and folder name the three scripts share, built in one place.

What the repo ships or holds for every run, data/datasets/ and memscore/, is found in the repo (the
folder of this file), whatever the working directory: a script run from elsewhere reads the same
data and mem-scores, and compute_memscore.py writes where the other scripts look. What a run makes,
result/<ds>_<model>/... and log/<ds>_<model>/..., is relative to the working directory, as in the
paper's release: runs started from different folders keep apart.
A seed other than the default (7) gets its own namespace, <ds>_<model>_seed<k>, and --tag its own
result folders and log file (<prefix>_tag-<tag>), so that no two settings share a name; the release's
commands keep the release's names.
The bottom layer with common.py: it imports nothing of the project; what a defense decides about its
names (whether its argument is part of them) reaches it as plain values.
"""

import os

REPO_DIR = os.path.dirname(os.path.abspath(__file__))
DATA_ROOT = os.path.join(REPO_DIR, "data", "datasets")  # absolute: follows the repo
RESULT_ROOT = "result"  # relative: follows the working directory
LOG_ROOT = "log"  # relative: follows the working directory
MEMSCORE_ROOT = os.path.join(REPO_DIR, "memscore")  # absolute: follows the repo
DEFAULT_SEED = 7  # the scripts' --seed default: runs with it keep the release's folder names


def run_name(args) -> str:
    """<ds>_<model>, or <ds>_<model>_seed<k> for a seed other than the default."""
    name = f"{args.dataset_name}_{args.model_name}"
    return name if args.seed == DEFAULT_SEED else f"{name}_seed{args.seed}"


def result_dir(args) -> str:
    return os.path.join(RESULT_ROOT, run_name(args))


def log_dir(args) -> str:
    return os.path.join(LOG_ROOT, run_name(args))


def tb_dir(args) -> str:
    """TensorBoard runs: log/<ds>_<model>/tb/ (summarize.py skips this folder)."""
    return os.path.join(log_dir(args), "tb")


SPLIT_FILE = "split.npz"  # in result/<ds>_<model>/, beside the model folders


def split_path(args) -> str:
    return os.path.join(result_dir(args), SPLIT_FILE)


def pretrained_dir(args, shadow: int = None) -> str:
    name = "victim_model" if shadow is None else f"shadow_model_{shadow}"
    return os.path.join(result_dir(args), name)


def model_prefix(
    pruner_name: str, sparsity: float, defense: str = "base", defend_arg: float = None, auto: bool = False
) -> str:
    """<pruner>_<sparsity>[_<defense>[_auto][_<defend_arg>]], the release's name of a pruned run (docs/pipeline.md).
    Base adds nothing; defend_arg is passed only by the defenses whose argument is part of the name, auto only
    by a run with a setting derived from the data (docs/defenses.md: `auto`)."""
    name = f"{pruner_name}_{float(sparsity)}"
    if defense and defense != "base":
        name += f"_{defense}" + ("_auto" if auto else "")
    if defend_arg is not None:
        name += f"_{float(defend_arg)}"
    return name


def tagged(name: str, tag: str = "") -> str:
    """name, or name_tag-<tag> when a --tag is given."""
    return f"{name}_tag-{tag}" if tag else name


def pruned_dir(args, prefix: str, shadow: int = None) -> str:
    name = f"{prefix}_model" if shadow is None else f"shadow_{prefix}_model_{shadow}"
    return os.path.join(result_dir(args), name)


def log_path(args, auto: bool = False) -> str:
    """log/<ds>_<model>/<pruner>_<sparsity>_<defend>[_auto][_tag-<tag>].txt (Base written as 'base'); auto: a
    setting of the defense is derived from the data, as in model_prefix."""
    defend = (args.defend or "base") + ("_auto" if auto else "")
    name = tagged(f"{args.pruner_name}_{float(args.prune_sparsity)}_{defend}", args.tag)
    return os.path.join(log_dir(args), f"{name}.txt")


def memscore_path(dataset_name: str, model_name: str) -> str:
    return os.path.join(MEMSCORE_ROOT, f"memscore_{dataset_name}_{model_name}.csv")


def checkpoint(folder: str) -> str:
    return os.path.join(folder, "best.pth")


def mask_file(folder: str) -> str:
    return os.path.join(folder, "best_mask.pth")


def completion_file(folder: str) -> str:
    """complete.json: written once the folder's model is final (docs/troubleshooting.md)."""
    return os.path.join(folder, "complete.json")


def staging_dir(folder: str, pid=None) -> str:
    """<folder>.partial-<host>-<pid> (this process's by default): where a run writes a model folder until the
    model is final (train.Staging). Host and pid keep two runs apart, also on a shared filesystem."""
    return f"{folder}.partial-{os.uname().nodename}-{os.getpid() if pid is None else pid}"


def split_of(folder: str) -> str:
    """The split.npz that the models in a run's model folder were trained on."""
    return os.path.join(os.path.dirname(folder), SPLIT_FILE)


# ---------------------------------------------------------------- the audit (audit.py, docs/audit.md)

AUDIT_PLAN = "plan.npz"  # canaries, membership matrix, dev/test rows
AUDIT_MEMSCORE = "memscore.csv"  # mem-scores estimated from the audit's pretrained models (+ memscore.json)
AUDIT_CSV = "audit.csv"
AUDIT_COMPARE = "compare"  # .csv and .md: several seeds' audits side by side (audit.py compare)
AUDIT_MD = "audit.md"  # the audit table and its paired comparisons, as summarize prints them
AUDIT_PLANE = "audit_plane.png"
AUDIT_DECILES = "audit_deciles.md"
AUDIT_PRETRAINED = "pretrained"  # the stage of the unpruned models


def audit_dir(args) -> str:
    """result/<ds>_<model>[_seed<k>]/audit[_tag-<audit_tag>]/: everything one audit writes but its logs."""
    return os.path.join(result_dir(args), tagged("audit", getattr(args, "audit_tag", "")))


def audit_plan_path(args) -> str:
    return os.path.join(audit_dir(args), AUDIT_PLAN)


def audit_model_dir(args, stage: str, model: int, tuning: bool = False) -> str:
    """<audit>/<stage>/model_<m>: model m of a stage (AUDIT_PRETRAINED or a pruned run's prefix); the DP tuning
    shadows live apart, under <audit>/tuning/<stage>/."""
    parts = ["tuning"] if tuning else []
    return os.path.join(audit_dir(args), *parts, stage, f"model_{model}")


def audit_memscore_path(args) -> str:
    return os.path.join(audit_dir(args), AUDIT_MEMSCORE)


def audit_scores_path(args, stage: str) -> str:
    """Every pool and test row's logits on every model of a stage, and the attacks' scores (.npz)."""
    return os.path.join(audit_dir(args), "scores", f"{stage}.npz")


def audit_record_path(args, stage: str) -> str:
    """The attack record of a stage (JSON): what audit.csv's row is built from."""
    return os.path.join(audit_dir(args), "records", f"{stage}.json")


def audit_log_path(args, stage: str) -> str:
    """log/<ds>_<model>[_seed<k>]/audit[_tag-<audit_tag>]/<stage>.txt (a folder, which summarize.py passes by)."""
    return os.path.join(log_dir(args), tagged("audit", getattr(args, "audit_tag", "")), f"{stage}.txt")
