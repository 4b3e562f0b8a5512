"""Membership inference attacks, registered by name, adaptive to the shadow models given.

Every attack sees the shadows' outputs on their own members / non-members (to calibrate or to
train on) and the victim's outputs on its members / non-members (to be scored), and returns one
AttackResult per reported attack: accuracy in percent plus the continuous member score of every
victim sample (higher = more likely a member).
"""
from collections import namedtuple
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score, roc_curve

from common import UsageError
from datasets import TensorData
from models import build_attack_model
from progress import Progress
from train import make_optimizer, predict, train_pass

SENS_DRAWS, SENS_EPS = 10, 1e-3
ATTACK_EPOCHS, ATTACK_BATCH = 100, 128


@dataclass
class Outputs:
    """One or more models' outputs on their members (member=True) and non-members."""
    probs: torch.Tensor          # (N, C) softmax
    labels: torch.Tensor         # (N,)
    member: torch.Tensor         # (N,) bool
    sens: torch.Tensor = None    # (N, C) sensitivity, only when an attack needs it
    logits: torch.Tensor = None  # (N, C) raw outputs (LiRA's stable log-odds need them)
    shadow_logits: torch.Tensor = None  # (S, N, C) every shadow model's logits on these samples;
    #                                     victim only, only when an attack needs it (LiRA)

    @staticmethod
    def cat(parts):
        """Stack several models' outputs on their own samples (shadow_logits does not stack)."""
        def cat_field(name):
            return None if getattr(parts[0], name) is None else torch.cat([getattr(p, name) for p in parts])
        return Outputs(cat_field("probs"), cat_field("labels"), cat_field("member"), cat_field("sens"),
                       cat_field("logits"))


@dataclass
class AttackResult:
    name: str             # as in the log line "<name> attack accuracy: x"
    accuracy: float       # percent
    scores: np.ndarray    # member score of every victim sample
    member: np.ndarray    # victim ground truth
    decisions: np.ndarray = None  # the member decision behind `accuracy`, per victim sample (None: none)
    accuracy_kind: str = "best_balanced"  # how `accuracy` follows from decisions or scores (intervals.py)


@torch.inference_mode()
def sensitivity(model, x, draws=SENS_DRAWS, eps=SENS_EPS):
    """Mean over `draws` of |softmax(f(x + eps*u)) - softmax(f(x))| / eps, u ~ N(0, I); (B, C)."""
    p = F.softmax(model(x), dim=1)
    noisy = (x.unsqueeze(0) + eps * torch.randn((draws,) + x.shape, device=x.device)).flatten(0, 1)
    q = F.softmax(model(noisy), dim=1).view(draws, *p.shape)
    return ((q - p).abs() / eps).mean(0)


def attacked_rows(split) -> torch.Tensor:
    """The samples an attack scores for a model: split.train (members) then split.test (non-members)."""
    return torch.cat([split.train, split.test])


@torch.no_grad()  # not inference_mode: attack models train on these tensors
def model_outputs(model, data: TensorData, split, with_sens: bool, batch_size: int = 1024) -> Outputs:
    """The model's outputs on split.train (members) then split.test (non-members)."""
    idx = attacked_rows(split)
    member = torch.cat([torch.ones(len(split.train), dtype=torch.bool),
                        torch.zeros(len(split.test), dtype=torch.bool)]).to(idx.device)
    logits = predict(model, data, idx, batch_size)
    probs = F.softmax(logits, dim=1)
    sens = None
    if with_sens:
        model.eval()
        sens = torch.cat([sensitivity(model, data.batch(b)[0]) for b in idx.split(batch_size // SENS_DRAWS)])
    return Outputs(probs, data.y[idx], member, sens, logits)


# ---------------------------------------------------------------- ROC metrics

FPR_TARGETS = (0.01, 0.001)  # reported as TPR@1%FPR and TPR@0.1%FPR


def _rankable(scores):
    """Finite scores with the same order: nan/-inf (a diverged model) rank lowest, +inf highest."""
    scores = np.asarray(scores, dtype=np.float64)
    finite = scores[np.isfinite(scores)]
    low, high = (finite.min() - 1, finite.max() + 1) if len(finite) else (0.0, 1.0)
    return np.nan_to_num(scores, nan=low, posinf=high, neginf=low)


def roc_metrics(scores, member) -> tuple:
    """(AUC, {fpr target: TPR in %}) of a member score (higher = member), with scikit-learn's ROC.
    TPR@x is the standard read-out: the highest TPR among ROC points whose FPR is <= x (no
    interpolation), so an attack must really reach that FPR to be credited."""
    scores, member = _rankable(scores), np.asarray(member, dtype=bool)
    fpr, tpr, _ = roc_curve(member, scores, drop_intermediate=False)
    tpr_at = {target: 100 * float(tpr[fpr <= target].max()) for target in FPR_TARGETS}
    return float(roc_auc_score(member, scores)), tpr_at


def best_balanced_accuracy(scores, member) -> float:
    """Best 0.5 * (TPR + TNR) over all thresholds on the victim itself, in %: an oracle upper bound."""
    fpr, tpr, _ = roc_curve(np.asarray(member, dtype=bool), _rankable(scores), drop_intermediate=False)
    return 100 * float((0.5 * (tpr + 1 - fpr)).max())


METRIC_DIGITS = {"AUC": 4}  # decimals in the log; 3 for the TPR@FPR metrics


def metric_values(result: AttackResult) -> dict:
    """{"AUC": auc, "TPR@1%FPR": tpr, "TPR@0.1%FPR": tpr}: what follows "<name> attack accuracy: x"."""
    auc, tpr_at = roc_metrics(result.scores, result.member)
    return {"AUC": auc, **{f"TPR@{100 * target:g}%FPR": tpr for target, tpr in tpr_at.items()}}


def metric_lines(result: AttackResult, values: dict = None) -> list:
    """The log lines of metric_values(result) (or of `values`, computed from it before)."""
    values = metric_values(result) if values is None else values
    return [f"{result.name} attack {metric}: {value:.{METRIC_DIGITS.get(metric, 3)}f}"
            for metric, value in values.items()]


# ---------------------------------------------------------------- metric (threshold) attacks

def _log(x):
    return np.log(np.maximum(x, 1e-20))


def conf_values(probs, labels):
    return probs[np.arange(len(labels)), labels]


def entr_values(probs, labels):
    """-entropy."""
    return (probs * _log(probs)).sum(1)


def mentr_values(probs, labels):
    """-modified entropy (Song & Mittal 2021): (1-p_y) log p_y + sum_{i!=y} p_i log(1-p_i)."""
    rows = np.arange(len(labels))
    p_y = probs[rows, labels]
    others = probs * _log(1 - probs)
    others[rows, labels] = 0.0
    return (1 - p_y) * _log(p_y) + others.sum(1)


def best_threshold(member_values: np.ndarray, nonmember_values: np.ndarray) -> float:
    """The candidate (member values then non-member values, in that order) that first reaches the
    highest 0.5 * (P[member >= t] + P[non-member < t]); 0 when none scores above 0. This is the
    literal quadratic rule, computed with sorted counts in O(n log n)."""
    candidates = np.concatenate([member_values, nonmember_values])
    if len(candidates) == 0:
        return 0.0
    with np.errstate(invalid="ignore", divide="ignore"):
        at_or_above = len(member_values) - np.searchsorted(np.sort(member_values), candidates, "left")
        below = np.searchsorted(np.sort(nonmember_values), candidates, "left")
        acc = 0.5 * (at_or_above / (len(member_values) + 0.0) + below / (len(nonmember_values) + 0.0))
    acc = np.where(np.isnan(acc), -np.inf, acc)
    best = int(np.argmax(acc))
    return float(candidates[best]) if acc[best] > 0 else 0.0


def threshold_decisions(shadow_values, shadow_groups, shadow_member, victim_values, victim_groups, num_groups):
    """Per-group thresholds fitted on the shadows, applied to the victim: its member decisions."""
    thresholds = np.zeros(num_groups)
    for g in range(num_groups):
        in_group = shadow_groups == g
        thresholds[g] = best_threshold(shadow_values[in_group & shadow_member],
                                       shadow_values[in_group & ~shadow_member])
    return victim_values >= thresholds[victim_groups]


def balanced_accuracy(said_member, member) -> float:
    """0.5 * (TPR + TNR) of member decisions, in %."""
    return 100 * 0.5 * (said_member[member].mean() + (~said_member[~member]).mean())


def threshold_accuracy(shadow_values, shadow_groups, shadow_member, victim_values, victim_groups,
                       victim_member, num_groups):
    """Per-group thresholds fitted on the shadows, applied to the victim; balanced accuracy in %."""
    said_member = threshold_decisions(shadow_values, shadow_groups, shadow_member, victim_values, victim_groups,
                                      num_groups)
    return balanced_accuracy(said_member, victim_member)


# ---------------------------------------------------------------- registry

# fn(shadow, victim, num_cls, progress, semantics) -> [AttackResult], one per name in `reports` (the log
# names, in order); semantics is --semantics (release or corrected). The flags ask mia_modi.py for optional Outputs fields: needs_sensitivity fills `sens` (shadow
# and victim), needs_shadow_logits fills victim.shadow_logits.
Attack = namedtuple("Attack", "fn reports needs_sensitivity needs_shadow_logits")
ATTACKS = {}   # --attacks name -> Attack, in log order


def register(name: str, reports: list, needs_sensitivity: bool = False, needs_shadow_logits: bool = False):
    def add(fn):
        ATTACKS[name] = Attack(fn, tuple(reports), needs_sensitivity, needs_shadow_logits)
        return fn
    return add


def report_names() -> list:
    """Every attack's log name ("SAMIA", "Conf", ...) in log order."""
    return [name for attack in ATTACKS.values() for name in attack.reports]


def parse_attacks(text: str) -> list:
    """Comma list -> attack names in the registry's (= the log's) order."""
    names = [a.strip() for a in text.split(",") if a.strip()]
    unknown = [a for a in names if a not in ATTACKS]
    if unknown or not names:
        raise UsageError(f"unknown attack '{','.join(unknown) or text}'; valid: {', '.join(ATTACKS)} "
                         f"(comma separated)")
    return [a for a in ATTACKS if a in names]


def _nn_attack(name, kind, features, shadow, victim, num_cls, progress):
    """Train an attack model on the shadows' features; report it on the victim's."""
    train = TensorData(features(shadow), shadow.member.long())
    test = TensorData(features(victim), victim.member.long())
    model = build_attack_model(kind, train.x.shape[1], num_cls).to(train.x.device)
    optimizer = make_optimizer(model.parameters(), "sgd", 1e-3, 5e-4)
    schedule = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[50, 75], gamma=0.1)
    all_rows = torch.arange(len(train), device=train.x.device)
    for _ in progress.bar(range(ATTACK_EPOCHS), desc=f"{name} attack model"):
        train_pass(model, train, all_rows, optimizer, ATTACK_BATCH)
        schedule.step()
    logits = predict(model, test, torch.arange(len(test), device=test.x.device))
    said = logits.argmax(1)
    accuracy = 100 * (said == test.y).float().mean().item()
    scores = F.softmax(logits, 1)[:, 1]
    return [AttackResult(name, accuracy, scores.cpu().numpy(), victim.member.cpu().numpy(),
                         (said == 1).cpu().numpy(), "plain")]


def _onehot(o, num_cls):
    return F.one_hot(o.labels, num_cls).float()


@register("samia", ["SAMIA"], needs_sensitivity=True)
def samia(shadow, victim, num_cls, progress=Progress(), semantics="release"):
    feats = lambda o: torch.cat([o.probs, o.sens, _onehot(o, num_cls)], 1)
    return _nn_attack("SAMIA", "transformer", feats, shadow, victim, num_cls, progress)


@register("threshold", ["Conf", "Entr", "Mentr", "Hconf"])
def threshold(shadow, victim, num_cls, progress=Progress(), semantics="release"):
    """Conf, Entr, Mentr with per-class thresholds; Hconf with one threshold for all classes. The features
    are computed in float32 as in the release (semantics "release") or in float64 ("corrected"), which
    moves Mentr on very confident outputs."""
    dtype = torch.float32 if semantics == "release" else torch.float64
    sp, sy, sm = (t.cpu().numpy() for t in (shadow.probs.to(dtype), shadow.labels, shadow.member))
    vp, vy, vm = (t.cpu().numpy() for t in (victim.probs.to(dtype), victim.labels, victim.member))
    results = []
    for name, values, groups in (("Conf", conf_values, num_cls), ("Entr", entr_values, num_cls),
                                 ("Mentr", mentr_values, num_cls), ("Hconf", conf_values, 1)):
        sv, vv = values(sp, sy), values(vp, vy)
        sg, vg = (sy, vy) if groups > 1 else (np.zeros_like(sy), np.zeros_like(vy))
        said = threshold_decisions(sv, sg, sm, vv, vg, groups)
        results.append(AttackResult(name, balanced_accuracy(said, vm), vv, vm, said, "balanced"))
    return results


@register("nn", ["NN"])
def nn_probs(shadow, victim, num_cls, progress=Progress(), semantics="release"):
    return _nn_attack("NN", "mia_fc", lambda o: o.probs, shadow, victim, num_cls, progress)


@register("nn_top3", ["Top3-NN"])
def nn_top3(shadow, victim, num_cls, progress=Progress(), semantics="release"):
    return _nn_attack("Top3-NN", "mia_fc", lambda o: o.probs.topk(3, dim=1).values, shadow, victim, num_cls, progress)


@register("nn_cls", ["NNCl"])
def nn_cls(shadow, victim, num_cls, progress=Progress(), semantics="release"):
    feats = lambda o: torch.cat([o.probs, _onehot(o, num_cls)], 1)
    return _nn_attack("NNCl", "mia_fc", feats, shadow, victim, num_cls, progress)


# ---------------------------------------------------------------- offline LiRA

LIRA_PER_SAMPLE_VAR_MIN = 64  # shadows needed before per-sample variances beat one pooled variance


def logit_confidence(logits, labels):
    """log(p_y / (1 - p_y)) computed from logits as z_y - logsumexp_{j != y} z_j: no 1 - p_y
    cancellation, no clamping, exact for confidences that round to 1 in float32."""
    z = logits.double()
    rows = torch.arange(len(labels), device=z.device)
    others = z.clone()
    others[rows, labels] = -torch.inf
    return z[rows, labels] - torch.logsumexp(others, dim=1)


def lira_scores(shadow_values, victim_values):
    """Offline LiRA (Carlini et al. 2022). shadow_values (S, N): each shadow's log-odds on the
    victim's samples, all OUT (no shadow trained on them). Fit N(mu_i, var) per sample and score
    -log P[OUT >= victim value]: higher = member. The variance is pooled over all samples unless there
    are LIRA_PER_SAMPLE_VAR_MIN shadows (per-sample variances from a few shadows are too noisy);
    one shadow has no spread around its own mean, so it falls back to the spread over samples."""
    count = shadow_values.shape[0]
    mean = shadow_values.mean(0)
    if count >= LIRA_PER_SAMPLE_VAR_MIN:
        var = shadow_values.var(0)
    elif count > 1:
        var = ((shadow_values - mean) ** 2).sum() / (shadow_values.shape[1] * (count - 1))
    else:
        var = shadow_values.var()
    z = (victim_values - mean) / var.clamp_min(1e-12).sqrt()
    return -torch.special.log_ndtr(-z)  # -log of the upper tail, stable far into it


@register("lira", ["LiRA"], needs_shadow_logits=True)
def lira(shadow, victim, num_cls, progress=Progress(), semantics="release"):
    """Offline LiRA. Its accuracy is the best balanced accuracy over thresholds chosen on the victim
    (as the LiRA paper reports it), an upper bound rather than a shadow-calibrated accuracy."""
    shadow_values = torch.stack([logit_confidence(z, victim.labels) for z in victim.shadow_logits])
    scores = lira_scores(shadow_values, logit_confidence(victim.logits, victim.labels)).cpu().numpy()
    member = victim.member.cpu().numpy()
    return [AttackResult("LiRA", best_balanced_accuracy(scores, member), scores, member)]
