"""Every file and folder name the three scripts share, built in one place.

Folders are relative to the working directory, as in the paper's release:
result/<ds>_<model>/..., log/<ds>_<model>/..., memscore/, data/datasets/.
"""
import os

DATA_ROOT = os.path.join("data", "datasets")
RESULT_ROOT = "result"
LOG_ROOT = "log"
MEMSCORE_ROOT = "memscore"


def run_name(args):
    return f"{args.dataset_name}_{args.model_name}"


def result_dir(args):
    return os.path.join(RESULT_ROOT, run_name(args))


def log_dir(args):
    return os.path.join(LOG_ROOT, run_name(args))


def tb_dir(args):
    """TensorBoard runs: log/<ds>_<model>/tb/ (summarize.py skips this folder)."""
    return os.path.join(log_dir(args), "tb")


def split_path(args):
    return os.path.join(result_dir(args), "split.npz")


def pretrained_dir(args, shadow=None):
    name = "victim_model" if shadow is None else f"shadow_model_{shadow}"
    return os.path.join(result_dir(args), name)


def prefix(pruner_name, sparsity, defend, defend_arg):
    """<pruner>_<sparsity>[_<defend>[_<defend_arg>]], the release's result-folder stem."""
    from defenses import get_defense  # the defense decides whether its argument is in the name
    cls = get_defense(defend)
    name = f"{pruner_name}_{float(sparsity)}"
    if cls.name != "base":
        name += f"_{cls.name}"
    if cls.arg_in_name:
        name += f"_{float(defend_arg)}"
    return name


def pruned_dir(args, prefix_, shadow=None):
    name = f"{prefix_}_model" if shadow is None else f"shadow_{prefix_}_model_{shadow}"
    return os.path.join(result_dir(args), name)


def log_path(args):
    """log/<ds>_<model>/<pruner>_<sparsity>_<defend>.txt (Base written as 'base')."""
    defend = args.defend or "base"
    return os.path.join(log_dir(args), f"{args.pruner_name}_{float(args.prune_sparsity)}_{defend}.txt")


def memscore_path(dataset_name, model_name):
    return os.path.join(MEMSCORE_ROOT, f"memscore_{dataset_name}_{model_name}.csv")


def checkpoint(folder):
    return os.path.join(folder, "best.pth")


def mask_file(folder):
    return os.path.join(folder, "best_mask.pth")
