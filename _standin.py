"""TEMPORARY stand-ins for ensemble.py (part A) and loo_attacks.py (part B) of issue 27, so that audit.py runs end
to end before they land. Delete this file when merging A and B: audit.py imports it in one place only (its
`from _standin import ...` line becomes `from ensemble import ...` and `from loo_attacks import ...`).

Plain sequential / literal implementations of the agreed names, not tuned or polished.
"""

import copy

import numpy as np
import torch
import torch.nn.functional as F

from attacks import logit_confidence, roc_metrics
from intervals import FPR_TARGETS
from train import evaluate, fit, make_optimizer, predict, train_pass

# ---------------------------------------------------------------- ensemble.py (A)


def fit_ensemble(
    models,
    data,
    train_idx,
    dev_idx,
    epochs,
    batch_size,
    lr,
    optimizer,
    weight_decay,
    generators,
    masks=None,
    early_stop=0,
    start_acc=-1.0,
    optimizers=None,
    restore_best=True,
):
    """Model by model with train.fit. Model m shuffles (and drops out) with generators[m]'s stream, which is
    advanced, so calling again continues it. masks[m] ({layer: 0/1}) are multiplied into the weights before
    every forward, as pruning.Pruner does; optimizers[m] (kept across calls) or a new one per call; with
    restore_best the model ends at its best-dev epoch (masked), else at its last. Returns [(best dev acc, best
    epoch)]."""
    out = []
    for m, model in enumerate(models):
        dev = dev_idx[m] if isinstance(dev_idx, (list, tuple)) else dev_idx
        opt = (
            optimizers[m] if optimizers is not None else make_optimizer(model.parameters(), optimizer, lr, weight_decay)
        )
        modules = dict(model.named_modules())
        hooks = []
        if masks is not None:
            for name, mask in masks[m].items():
                hooks.append(modules[name].register_forward_pre_hook(_apply(mask)))
        best = {"epoch": -1}

        def on_best(epoch, acc, loss, model=model, m=m, best=best):
            state = copy.deepcopy(model.state_dict())
            for name, mask in (masks[m] if masks is not None else {}).items():
                state[f"{name}.weight"].mul_(mask)
            best.update(epoch=epoch, state=state)

        cuda = generators[m].device.type == "cuda"
        get_state, set_state = (
            (torch.cuda.get_rng_state, torch.cuda.set_rng_state) if cuda else (torch.get_rng_state, torch.set_rng_state)
        )
        outer = get_state()
        set_state(generators[m].get_state())
        try:
            acc, _ = fit(
                model,
                lambda epoch, model=model, m=m, opt=opt: train_pass(model, data, train_idx[m], opt, batch_size),
                data,
                dev,
                dev[:1],
                epochs,
                early_stop,
                on_best,
                start_acc=start_acc,
            )
            generators[m].set_state(get_state())
        finally:
            set_state(outer)
            for hook in hooks:
                hook.remove()
        if restore_best and best["epoch"] >= 0:
            model.load_state_dict(best["state"])
        out.append((acc, best["epoch"]))
    return out


def _apply(mask):
    def hook(module, inputs):
        with torch.no_grad():
            module.weight.mul_(mask)

    return hook


def predict_ensemble(models, data, idx) -> torch.Tensor:
    """[M, len(idx), C] logits."""
    return torch.stack([predict(model, data, idx) for model in models])


def dev_loss(model, data, idx) -> float:
    return evaluate(model, data, idx)[1]


# ---------------------------------------------------------------- loo_attacks.py (B)

LIRA_ONLINE_PER_SAMPLE_MIN = 32


def lira_online_loo(logits, labels, member, per_sample_var=None) -> np.ndarray:
    """[M, N] log-likelihood ratio IN vs OUT of each model's logit-scaled confidence, the Gaussians fitted over
    the other models. A sample without an IN or an OUT reference scores 0."""
    logits, labels, member = torch.as_tensor(logits), torch.as_tensor(labels), np.asarray(member, bool)
    phi = torch.stack([logit_confidence(z, labels) for z in logits]).numpy()
    models = len(phi)
    per_sample = models >= LIRA_ONLINE_PER_SAMPLE_MIN if per_sample_var is None else per_sample_var
    scores = np.zeros_like(phi)
    for m in range(models):
        others = np.arange(models) != m
        p, w = phi[others], member[others]
        fits = []
        for side in (w, ~w):
            count = side.sum(0)
            with np.errstate(invalid="ignore", divide="ignore"):
                mean = np.where(side, p, 0).sum(0) / count
                dev2 = np.where(side, (p - mean) ** 2, 0)
                var = (
                    dev2.sum(0) / np.maximum(count - 1, 1)
                    if per_sample
                    else np.full(p.shape[1], dev2.sum() / max(count.sum() - 1, 1))
                )
            fits.append((mean, np.maximum(var, 1e-12), count))
        (mi, vi, ci), (mo, vo, co) = fits
        x = phi[m]
        llr = -0.5 * ((x - mi) ** 2 / vi + np.log(vi)) + 0.5 * ((x - mo) ** 2 / vo + np.log(vo))
        scores[m] = np.where((ci > 0) & (co > 0), llr, 0.0)
    return scores


def rmia_loo(logits, labels, member, gamma=1.0, population=None) -> np.ndarray:
    """[M, N] RMIA with IN references: ratio(x) = p_m(y_x|x) / mean over k != m of p_k(y_x|x); score = the
    fraction of population samples z (not in model m's training set) with ratio(x) / ratio(z) > gamma."""
    logits, labels, member = torch.as_tensor(logits), torch.as_tensor(labels), np.asarray(member, bool)
    prob = F.softmax(logits.double(), dim=2)[:, torch.arange(len(labels)), labels].numpy()
    models = len(prob)
    scores = np.zeros_like(prob)
    for m in range(models):
        others = np.arange(models) != m
        ratio = prob[m] / prob[others].mean(0)
        z = np.flatnonzero(~member[m]) if population is None else np.asarray(population)
        scores[m] = (ratio[:, None] / ratio[None, z] > gamma).mean(1)
    return scores


def pool(scores, member, rows) -> tuple:
    """(scores, member, sample) of the M x len(rows) decisions."""
    scores, member, rows = np.asarray(scores), np.asarray(member, bool), np.asarray(rows)
    sample = np.broadcast_to(rows, (len(scores), len(rows)))
    return scores[:, rows].ravel(), member[:, rows].ravel(), sample.ravel()


def _weighted_metrics(order_member, groups, weights):
    """AUC and TPR@FPR of decisions sorted by score (descending, tie groups), each with a weight; weights (B, D)."""
    pos, neg = weights * order_member, weights * ~order_member
    gpos = np.zeros((len(weights), groups.max() + 1))
    gneg = np.zeros_like(gpos)
    for b in range(len(weights)):
        gpos[b] = np.bincount(groups, pos[b], groups.max() + 1)
        gneg[b] = np.bincount(groups, neg[b], groups.max() + 1)
    tp, fp = gpos.cumsum(1), gneg.cumsum(1)
    n_pos, n_neg = tp[:, -1:], fp[:, -1:]
    with np.errstate(invalid="ignore", divide="ignore"):
        out = {"AUC": (gpos * (n_neg - fp + 0.5 * gneg)).sum(1) / (n_pos * n_neg)[:, 0]}
        for metric, target in FPR_TARGETS.items():
            out[metric] = 100 * np.where(fp / n_neg <= target + 1e-12, tp / n_pos, 0).max(1)
    return out


def audit_metrics(scores, member, rows, resamples=1000, seed=0) -> dict:
    """{metric: (value, lo, hi)} for AUC, TPR@1%FPR, TPR@0.1%FPR of the pooled decisions of rows; 95 % cluster
    bootstrap over the rows (a resampled row brings all its M decisions)."""
    flat, truth, sample = pool(scores, member, rows)
    auc, tpr = roc_metrics(flat, truth)
    point = {"AUC": auc, "TPR@1%FPR": tpr[0.01], "TPR@0.1%FPR": tpr[0.001]}
    order = np.argsort(-flat, kind="stable")
    _, groups = np.unique(-flat[order], return_inverse=True)
    cluster = np.searchsorted(np.asarray(rows), sample[order]) if np.all(np.diff(rows) > 0) else None
    if cluster is None:
        _, cluster = np.unique(sample[order], return_inverse=True)
    rng = np.random.default_rng(seed)
    draws = {k: [] for k in point}
    for start in range(0, resamples, 100):
        b = min(100, resamples - start)
        counts = np.stack([np.bincount(rng.integers(0, len(rows), len(rows)), minlength=len(rows)) for _ in range(b)])
        for k, v in _weighted_metrics(truth[order], groups.ravel(), counts[:, cluster]).items():
            draws[k].append(v)
    out = {}
    for k, v in point.items():
        values = np.concatenate(draws[k]) if resamples else np.zeros(0)
        values = values[np.isfinite(values)]
        lo, hi = np.percentile(values, [2.5, 97.5]) if len(values) else (np.nan, np.nan)
        out[k] = (float(v), float(lo), float(hi))
    return out


def decile_table(scores, member, memscore, rows=None) -> list:
    """Per mem-score decile of rows: samples, mean mem-score, TPR at the threshold that gives 1 % FPR on ALL pooled
    non-member decisions, and the AUC of the decile's pooled decisions."""
    scores, member = np.asarray(scores), np.asarray(member, bool)
    rows = np.arange(scores.shape[1]) if rows is None else np.asarray(rows)
    flat, truth, _ = pool(scores, member, rows)
    cut = np.quantile(flat[~truth], 0.99) if (~truth).any() else np.inf
    ranked = rows[np.argsort(np.asarray(memscore)[rows], kind="stable")]
    table = []
    for d, part in enumerate(np.array_split(ranked, 10)):
        s, t, _ = pool(scores, member, part)
        auc = roc_metrics(s, t)[0] if 0 < t.sum() < len(t) else float("nan")
        table.append(
            {
                "decile": d + 1,
                "samples": len(part),
                "mean_memscore": float(np.asarray(memscore)[part].mean()) if len(part) else float("nan"),
                "TPR@1%FPR": 100 * float((s[t] > cut).mean()) if t.any() else float("nan"),
                "AUC": auc,
            }
        )
    return table
