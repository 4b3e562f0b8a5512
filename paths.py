"""Every file and folder name the three scripts share, built in one place.

Folders are relative to the working directory, as in the paper's release:
result/<ds>_<model>/..., log/<ds>_<model>/..., memscore/, data/datasets/.
A seed other than the default (7) gets its own namespace, <ds>_<model>_seed<k>, and --tag its own
result folders and log file (<prefix>_tag-<tag>), so that no two settings share a name; the release's
commands keep the release's names.
The bottom layer with common.py: it imports nothing of the project; what a defense decides about its
names (whether its argument is part of them) reaches it as plain values.
"""
import os

DATA_ROOT = os.path.join("data", "datasets")
RESULT_ROOT = "result"
LOG_ROOT = "log"
MEMSCORE_ROOT = "memscore"
DEFAULT_SEED = 7      # the scripts' --seed default: runs with it keep the release's folder names


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


def split_path(args) -> str:
    return os.path.join(result_dir(args), "split.npz")


def pretrained_dir(args, shadow: int = None) -> str:
    name = "victim_model" if shadow is None else f"shadow_model_{shadow}"
    return os.path.join(result_dir(args), name)


def model_prefix(pruner_name: str, sparsity: float, defense: str = "base", defend_arg: float = None) -> str:
    """<pruner>_<sparsity>[_<defense>[_<defend_arg>]], the release's name of a pruned run (README: Pipeline).
    Base adds nothing; defend_arg is passed only by the defenses whose argument is part of the name."""
    name = f"{pruner_name}_{float(sparsity)}"
    if defense and defense != "base":
        name += f"_{defense}"
    if defend_arg is not None:
        name += f"_{float(defend_arg)}"
    return name


def tagged(name: str, tag: str = "") -> str:
    """name, or name_tag-<tag> when a --tag is given."""
    return f"{name}_tag-{tag}" if tag else name


def pruned_dir(args, prefix: str, shadow: int = None) -> str:
    name = f"{prefix}_model" if shadow is None else f"shadow_{prefix}_model_{shadow}"
    return os.path.join(result_dir(args), name)


def log_path(args) -> str:
    """log/<ds>_<model>/<pruner>_<sparsity>_<defend>[_tag-<tag>].txt (Base written as 'base')."""
    defend = args.defend or "base"
    name = tagged(f"{args.pruner_name}_{float(args.prune_sparsity)}_{defend}", args.tag)
    return os.path.join(log_dir(args), f"{name}.txt")


def memscore_path(dataset_name: str, model_name: str) -> str:
    return os.path.join(MEMSCORE_ROOT, f"memscore_{dataset_name}_{model_name}.csv")


def checkpoint(folder: str) -> str:
    return os.path.join(folder, "best.pth")


def mask_file(folder: str) -> str:
    return os.path.join(folder, "best_mask.pth")


def completion_file(folder: str) -> str:
    """complete.json: written once the folder's model is final (README: Running the paper's grid)."""
    return os.path.join(folder, "complete.json")
