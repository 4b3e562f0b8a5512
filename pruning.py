"""Iterative magnitude pruning with NNI 2.3 LotteryTicketPruner semantics (reset_weights=False),
on plain masks.

Iteration 0 fine-tunes densely; iteration t >= 1 gives every selected layer sparsity
s_t = 1 - (1 - s)^(t/P), P = prune_iter - 1. Masks are per layer: with w = weight * mask and
k = int(numel * s_t), mask = |w| > (k-th smallest |w|). As in NNI, the mask is multiplied into the
weight before every forward, so pruned weights are zero whenever the model runs while the optimizer
(and its Adam state) keeps going; weights are never rewound.
"""

import argparse

import torch
import torch.nn as nn

from common import MissingError, UsageError, load_torch, save_torch
from paths import checkpoint, mask_file
from train import save_checkpoint

PRUNERS = ("iter_pruning", "iter_prunetxt", "l1unstructure")


def tag_type(text: str) -> str:
    """--tag: letters, digits, '.' and '-' (no '_', so names split back into their parts)."""
    if not all(c.isascii() and (c.isalnum() or c in ".-") for c in text):
        raise argparse.ArgumentTypeError(f"{text!r} may hold only letters, digits, '.' and '-'")
    return text


def add_pruning_flags(parser: argparse.ArgumentParser) -> None:
    """--pruner_name, --prune_sparsity and --tag, the same in prune_modi.py and mia_modi.py."""
    parser.add_argument("--pruner_name", default="l1unstructure", help=", ".join(PRUNERS))
    parser.add_argument("--prune_sparsity", type=float, default=0.6)
    parser.add_argument(
        "--tag",
        default="",
        type=tag_type,
        help="a name for this setting, added to the pruned folders and the log file "
        "(letters, digits, '.', '-'; docs/grid.md)",
    )


def check_pruning_flags(pruner_name: str, sparsity: float) -> None:
    """--pruner_name and --prune_sparsity, shared by prune_modi.py and mia_modi.py. Sparsity 0 is the
    fine-tuning control: the same iterations and epochs, no weight removed, so a comparison with it separates
    what the extra training does from what pruning does."""
    if pruner_name not in PRUNERS:
        raise UsageError(f"unknown pruner_name '{pruner_name}'; valid: {', '.join(PRUNERS)}")
    if not 0 <= sparsity < 1:
        raise UsageError(f"--prune_sparsity must be in [0, 1) (0: fine-tuned, not pruned), got {sparsity}")


def check_prune_iter(pruner_name: str, prune_iter: int) -> None:
    """The iterative pruners' first iteration prunes nothing (sparsity_schedule), so one iteration would file
    a dense model under the requested sparsity."""
    if pruner_name != "l1unstructure" and prune_iter < 2:
        raise UsageError(
            f"--prune_iter must be >= 2 for {pruner_name} (its first iteration prunes nothing, the "
            f"last reaches --prune_sparsity), got {prune_iter}; the paper uses 5"
        )


def prunable_layers(model: nn.Module, pruner_name: str) -> dict:
    """name -> module of the layers whose weights get masks (biases never do)."""
    if pruner_name not in PRUNERS:
        raise UsageError(f"unknown pruner_name '{pruner_name}'; valid: {', '.join(PRUNERS)}")
    if pruner_name == "iter_prunetxt":
        layers = {n: m for n, m in model.named_modules() if n.split(".")[-1] in ("fc1", "fc2")}
        if not layers:
            raise UsageError(
                "pruner iter_prunetxt prunes layers named fc1/fc2, which this model lacks; "
                "use --pruner_name iter_pruning for image models"
            )
        return layers
    return {n: m for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}


def sparsity_schedule(pruner_name: str, sparsity: float, prune_iter: int) -> list:
    """Target sparsity of each pruning iteration."""
    if pruner_name == "l1unstructure":
        return [sparsity]
    last = prune_iter - 1
    return [0.0] + [1 - (1 - sparsity) ** (t / last) for t in range(1, prune_iter)]


def magnitude_mask(weight: torch.Tensor, mask: torch.Tensor, sparsity: float) -> torch.Tensor:
    w = (weight * mask).abs().flatten()
    k = int(w.numel() * sparsity)
    if k == 0:
        return torch.ones_like(weight)
    threshold = w.kthvalue(k).values
    return (w > threshold).view_as(weight).to(weight.dtype)


class Pruner:
    """The masks of one model. With in_forward (the default) the masks are multiplied into the weights before
    every forward (forward pre-hooks); without, the caller applies them (a batched trainer that runs the model
    functionally, where an in-place hook on the module's own weight would not reach the weights in use)."""

    def __init__(self, model, pruner_name, sparsity, prune_iter, in_forward=True):
        self.model = model
        self.layers = prunable_layers(model, pruner_name)
        self.schedule = sparsity_schedule(pruner_name, sparsity, prune_iter)
        self.masks = {n: torch.ones_like(m.weight) for n, m in self.layers.items()}
        if in_forward:
            for name, layer in self.layers.items():
                layer.register_forward_pre_hook(self._hook(name))

    def _hook(self, name):
        def apply_mask(module, inputs):
            with torch.no_grad():
                module.weight.mul_(self.masks[name])

        return apply_mask

    def prune(self, iteration):
        """Recompute every mask for this iteration's sparsity and apply it."""
        sparsity = self.schedule[iteration]
        with torch.no_grad():
            for name, layer in self.layers.items():
                self.masks[name] = magnitude_mask(layer.weight, self.masks[name], sparsity)
                layer.weight.mul_(self.masks[name])

    def export(self, folder, epoch, acc, loss):
        """best.pth: state_dict with masks applied (loadable by the unpruned model); best_mask.pth."""
        with torch.no_grad():
            for name, layer in self.layers.items():
                layer.weight.mul_(self.masks[name])
        save_checkpoint(checkpoint(folder), self.model, epoch, acc, loss)
        save_torch({n: m.detach().cpu().clone() for n, m in self.masks.items()}, mask_file(folder))


def load_masks(path: str, fix: str = "rerun prune_modi.py for this setting") -> dict:
    """name -> weight mask from a best_mask.pth: ours ({name: mask}) or the release's
    ({name: {"weight": mask, "bias": mask or None}})."""
    masks = load_torch(path, "mask file", fix)
    if not isinstance(masks, dict) or not masks:
        raise MissingError(f"mask file {path} holds no masks; delete it and {fix}")
    weights = {}
    for name, mask in masks.items():
        if isinstance(mask, dict):  # the release's; biases are never pruned, so only the weight mask counts
            mask = mask.get("weight")
        if not isinstance(name, str) or not isinstance(mask, torch.Tensor):
            raise MissingError(
                f"mask file {path}: entry {name!r} is neither a mask nor {{weight: mask}}; delete it and {fix}"
            )
        weights[name] = mask
    return weights


def masked_fraction(masks) -> float:
    """Fraction of the weights under `masks` (0/1 tensors) that are masked out."""
    masks = list(masks)
    return sum(int((m == 0).sum()) for m in masks) / max(sum(m.numel() for m in masks), 1)


def check_pruned(model: nn.Module, folder: str, sparsity: float, fix: str, tolerance: float = 0.01) -> None:
    """A pruned model is what its folder's best_mask.pth says: every masked weight is zero and the masks'
    sparsity is the requested one (within `tolerance`), so a dense or other checkpoint copied into the folder
    is not attacked as pruned."""
    path = mask_file(folder)
    masks = load_masks(path, fix)
    modules = dict(model.named_modules())
    for name, mask in masks.items():
        weight = getattr(modules.get(name), "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.shape != mask.shape:
            raise MissingError(f"mask file {path} does not fit this model (layer {name}); {fix}")
        if weight.detach()[mask.to(weight.device) == 0].any():
            raise MissingError(
                f"{checkpoint(folder)} is not pruned as its mask {path} says (masked weights of "
                f"{name} are not zero: a dense or another run's checkpoint); {fix}"
            )
    measured = masked_fraction(masks.values())
    if abs(measured - sparsity) > tolerance:
        raise MissingError(
            f"{path} prunes {measured:.3f} of the weights, not the requested --prune_sparsity {sparsity}; {fix}"
        )
