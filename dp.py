"""The DP-SGD engine of the dp baseline (docs/defenses.md#baselines): per-microbatch gradients, clipping, noise.

Microbatch gradients come all at once through torch.func (vmap) for models without buffers, and one
microbatch at a time for models with BatchNorm (whose running statistics then update per microbatch).
"""

import torch
import torch.nn as nn
import torch.nn.functional as F


def _microbatch_grads_vmap(model, x, y, microbatch):
    """Yield (grads with a leading microbatch dim, logits, labels) for equal-size microbatches,
    all at once with torch.func. Only for models without buffers (no BatchNorm running stats)."""
    from torch.func import functional_call, grad, vmap

    params = {name: p.detach() for name, p in model.named_parameters()}

    def loss(params, xb, yb):
        logits = functional_call(model, params, (xb,))
        return F.cross_entropy(logits, yb), logits

    per_microbatch = vmap(grad(loss, has_aux=True), in_dims=(None, 0, 0), randomness="different")
    full = len(x) // microbatch * microbatch
    for xs, ys, size in ((x[:full], y[:full], microbatch), (x[full:], y[full:], len(x) - full)):
        if size:
            grads, logits = per_microbatch(params, xs.view(-1, size, *x.shape[1:]), ys.view(-1, size))
            yield grads, logits.flatten(0, 1), ys


def _microbatch_grads_loop(model, x, y, microbatch):
    """The same, one microbatch at a time with ordinary autograd (BatchNorm updates its running
    statistics once per microbatch)."""
    params = dict(model.named_parameters())
    for xb, yb in zip(x.split(microbatch), y.split(microbatch)):
        logits = model(xb)
        grads = torch.autograd.grad(F.cross_entropy(logits, yb), list(params.values()), allow_unused=True)
        yield (
            {name: (torch.zeros_like(p) if g is None else g)[None] for (name, p), g in zip(params.items(), grads)},
            logits.detach(),
            yb,
        )


def clipped_gradient_sum(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, microbatch: int, clip: float, drop_partial: bool = False
) -> tuple:
    """Sum over microbatches of each microbatch's mean-loss gradient, clipped to L2 norm <= clip.
    drop_partial (release): the examples that do not fill a last whole microbatch are left out, of the
    gradient and of the loss and count; otherwise (corrected) they form a smaller last microbatch.
    Returns (name -> summed gradient, summed loss, correct count)."""
    if drop_partial:  # cut here, so the vmap and the loop paths both see whole microbatches only
        full = len(y) // microbatch * microbatch
        x, y = x[:full], y[:full]
    total = {name: torch.zeros_like(p) for name, p in model.named_parameters()}
    loss_sum = torch.zeros((), device=y.device)
    correct = torch.zeros((), dtype=torch.long, device=y.device)
    has_buffers = any(True for _ in model.buffers())
    grads_of = _microbatch_grads_loop if has_buffers else _microbatch_grads_vmap
    batches = grads_of(model, x, y, microbatch) if len(y) else ()  # Poisson sampling can draw nobody
    for grads, logits, labels in batches:
        norms = torch.stack([g.flatten(1).pow(2).sum(1) for g in grads.values()]).sum(0).sqrt()
        scale = (clip / (norms + 1e-6)).clamp(max=1.0)
        for name, g in grads.items():
            total[name] += torch.tensordot(scale, g, dims=1)
        loss_sum += F.cross_entropy(logits, labels, reduction="sum").detach()
        correct += (logits.argmax(1) == labels).sum()
    return total, loss_sum, correct


def dp_gradient(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    microbatch: int,
    expected_batch: float,
    clip: float,
    sigma: float,
    drop_partial: bool = False,
) -> tuple:
    """Set .grad to (sum of clipped microbatch gradients + N(0, (clip*sigma)^2)) * microbatch/expected_batch.
    expected_batch is the divisor: the expected Poisson batch (corrected) or the configured batch size
    (release; the two differ only when the training set is smaller than a batch).
    drop_partial: leave out a last partial microbatch (release) instead of clipping it (corrected).
    Returns (summed loss, correct count) of the examples used."""
    total, loss_sum, correct = clipped_gradient_sum(model, x, y, microbatch, clip, drop_partial)
    for name, p in model.named_parameters():
        noise = torch.randn_like(p) * (clip * sigma) if sigma > 0 else 0
        p.grad = (total[name] + noise) * (microbatch / expected_batch)
    return loss_sum, correct
