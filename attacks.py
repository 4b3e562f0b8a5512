"""Membership inference attacks, registered by name, adaptive to the shadow models given.

Every attack sees the shadows' outputs on their own members / non-members (to calibrate or to
train on) and the victim's outputs on its members / non-members (to be scored), and returns one
AttackResult per reported attack: accuracy in percent plus the continuous member score of every
victim sample (higher = more likely a member).
"""

import math
from collections import namedtuple
from dataclasses import dataclass, field

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
RMIA_GAMMA = 1.0  # --rmia_gamma's default: a sample beats z when ratio(x) / ratio(z) > 1


@dataclass
class Outputs:
    """One or more models' outputs on their members (member=True) and non-members."""

    probs: torch.Tensor  # (N, C) softmax
    labels: torch.Tensor  # (N,)
    member: torch.Tensor  # (N,) bool
    sens: torch.Tensor = None  # (N, C) sensitivity, only when an attack needs it
    logits: torch.Tensor = None  # (N, C) raw outputs (LiRA's stable log-odds need them)
    shadow_logits: torch.Tensor = None  # (S, N, C) every shadow model's logits on these samples;
    #                                     victim only, only when an attack needs it (LiRA)
    references: "References" = None  # victim only, only when an attack needs it (RMIA)

    @staticmethod
    def cat(parts):
        """Stack several models' outputs on their own samples (shadow_logits does not stack)."""

        def cat_field(name):
            return None if getattr(parts[0], name) is None else torch.cat([getattr(p, name) for p in parts])

        return Outputs(
            cat_field("probs"), cat_field("labels"), cat_field("member"), cat_field("sens"), cat_field("logits")
        )


@dataclass
class AttackResult:
    name: str  # as in the log line "<name> attack accuracy: x"
    accuracy: float  # percent
    scores: np.ndarray  # member score of every victim sample
    member: np.ndarray  # victim ground truth
    notes: list = field(default_factory=list)  # extra log lines after the metric lines (RMIA's a)
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
    member = torch.cat(
        [torch.ones(len(split.train), dtype=torch.bool), torch.zeros(len(split.test), dtype=torch.bool)]
    ).to(idx.device)
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
    return [
        f"{result.name} attack {metric}: {value:.{METRIC_DIGITS.get(metric, 3)}f}" for metric, value in values.items()
    ]


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
        thresholds[g] = best_threshold(
            shadow_values[in_group & shadow_member], shadow_values[in_group & ~shadow_member]
        )
    return victim_values >= thresholds[victim_groups]


def balanced_accuracy(said_member, member) -> float:
    """0.5 * (TPR + TNR) of member decisions, in %."""
    return 100 * 0.5 * (said_member[member].mean() + (~said_member[~member]).mean())


def threshold_accuracy(
    shadow_values, shadow_groups, shadow_member, victim_values, victim_groups, victim_member, num_groups
):
    """Per-group thresholds fitted on the shadows, applied to the victim; balanced accuracy in %."""
    said_member = threshold_decisions(
        shadow_values, shadow_groups, shadow_member, victim_values, victim_groups, num_groups
    )
    return balanced_accuracy(said_member, victim_member)


# ---------------------------------------------------------------- registry

# fn(shadow, victim, num_cls, progress, semantics, options) -> [AttackResult], one per name in `reports` (the
# log names, in order); semantics is --semantics (release or corrected), options the parsed command line
# (an attack's own flags, see add_attack_flags). The flags ask mia_modi.py for optional Outputs fields:
# needs_sensitivity fills `sens` (shadow and victim), needs_shadow_logits fills victim.shadow_logits,
# needs_references fills victim.references. min_shadows: the fewest shadows the attack works with.
Attack = namedtuple("Attack", "fn reports needs_sensitivity needs_shadow_logits needs_references min_shadows")
ATTACKS = {}  # --attacks name -> Attack, in log order


def register(
    name: str,
    reports: list,
    needs_sensitivity: bool = False,
    needs_shadow_logits: bool = False,
    needs_references: bool = False,
    min_shadows: int = 1,
):
    def add(fn):
        ATTACKS[name] = Attack(
            fn, tuple(reports), needs_sensitivity, needs_shadow_logits, needs_references, min_shadows
        )
        return fn

    return add


def add_attack_flags(parser) -> None:
    """The attacks' own flags (mia_modi.py)."""
    parser.add_argument(
        "--attack_epochs",
        type=int,
        default=ATTACK_EPOCHS,
        help="training epochs of the SAMIA and NN attack models (the release's 100); the learning rate drops tenfold "
        "at half and at three quarters of them, as at the release's 50 and 75",
    )
    parser.add_argument(
        "--rmia_gamma",
        type=float,
        default=RMIA_GAMMA,
        help="RMIA: a sample beats a population sample z when ratio(x) / ratio(z) > gamma",
    )


def check_attack_flags(args) -> None:
    """args.attack_names, args.shadow_num and the attacks' own flags fit together."""
    for name in args.attack_names:
        if args.shadow_num < ATTACKS[name].min_shadows:
            raise UsageError(f"attack {name} needs --shadow_num >= {ATTACKS[name].min_shadows}, got {args.shadow_num}")
    if args.attack_epochs < 1:
        raise UsageError(f"--attack_epochs must be >= 1, got {args.attack_epochs}")
    if not (math.isfinite(args.rmia_gamma) and args.rmia_gamma > 0):
        raise UsageError(f"--rmia_gamma must be a finite number > 0, got {args.rmia_gamma}")


def true_label_prob(logits, labels) -> torch.Tensor:
    """Softmax probability of the true label, in float64."""
    return F.softmax(logits.double(), dim=1)[torch.arange(len(labels), device=logits.device), labels]


def report_names() -> list:
    """Every attack's log name ("SAMIA", "Conf", ...) in log order."""
    return [name for attack in ATTACKS.values() for name in attack.reports]


def parse_attacks(text: str) -> list:
    """Comma list -> attack names in the registry's (= the log's) order."""
    names = [a.strip() for a in text.split(",") if a.strip()]
    unknown = [a for a in names if a not in ATTACKS]
    if unknown or not names:
        raise UsageError(f"unknown attack '{','.join(unknown) or text}'; valid: {', '.join(ATTACKS)} (comma separated)")
    return [a for a in ATTACKS if a in names]


def nn_schedule(semantics: str, options) -> tuple:
    """(batch size, epochs) of the attack models' training: --batch_size under release (as the release's loaders),
    else 128; --attack_epochs (100, the release's). Without options (a direct call): 128 and 100."""
    if options is None:
        return ATTACK_BATCH, ATTACK_EPOCHS
    return options.batch_size if semantics == "release" else ATTACK_BATCH, options.attack_epochs


def _nn_attack(name, kind, features, shadow, victim, num_cls, progress, schedule=(ATTACK_BATCH, ATTACK_EPOCHS)):
    """Train an attack model on the shadows' features (schedule: batch size, epochs); report it on the victim's."""
    batch_size, epochs = schedule
    train = TensorData(features(shadow), shadow.member.long())
    test = TensorData(features(victim), victim.member.long())
    model = build_attack_model(kind, train.x.shape[1], num_cls).to(train.x.device)
    optimizer = make_optimizer(model.parameters(), "sgd", 1e-3, 5e-4)
    # The release's 100 epochs decay at 50 and 75; a shorter --attack_epochs keeps that shape.
    milestones = [epochs // 2, 3 * epochs // 4]
    lr_steps = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=0.1)
    all_rows = torch.arange(len(train), device=train.x.device)
    for _ in progress.bar(range(epochs), desc=f"{name} attack model"):
        train_pass(model, train, all_rows, optimizer, batch_size)
        lr_steps.step()
    logits = predict(model, test, torch.arange(len(test), device=test.x.device))
    said = logits.argmax(1)
    accuracy = 100 * (said == test.y).float().mean().item()
    scores = F.softmax(logits, 1)[:, 1]
    return [
        AttackResult(
            name,
            accuracy,
            scores.cpu().numpy(),
            victim.member.cpu().numpy(),
            decisions=(said == 1).cpu().numpy(),
            accuracy_kind="plain",
        )
    ]


def _onehot(o, num_cls):
    return F.one_hot(o.labels, num_cls).float()


@register("samia", ["SAMIA"], needs_sensitivity=True)
def samia(shadow, victim, num_cls, progress=Progress(), semantics="release", options=None):
    feats = lambda o: torch.cat([o.probs, o.sens, _onehot(o, num_cls)], 1)
    return _nn_attack("SAMIA", "transformer", feats, shadow, victim, num_cls, progress, nn_schedule(semantics, options))


@register("threshold", ["Conf", "Entr", "Mentr", "Hconf"])
def threshold(shadow, victim, num_cls, progress=Progress(), semantics="release", options=None):
    """Conf, Entr, Mentr with per-class thresholds; Hconf with one threshold for all classes. The features
    are computed in float32 as in the release (semantics "release") or in float64 ("corrected"), which
    moves Mentr on very confident outputs."""
    dtype = torch.float32 if semantics == "release" else torch.float64
    sp, sy, sm = (t.cpu().numpy() for t in (shadow.probs.to(dtype), shadow.labels, shadow.member))
    vp, vy, vm = (t.cpu().numpy() for t in (victim.probs.to(dtype), victim.labels, victim.member))
    results = []
    for name, values, groups in (
        ("Conf", conf_values, num_cls),
        ("Entr", entr_values, num_cls),
        ("Mentr", mentr_values, num_cls),
        ("Hconf", conf_values, 1),
    ):
        sv, vv = values(sp, sy), values(vp, vy)
        sg, vg = (sy, vy) if groups > 1 else (np.zeros_like(sy), np.zeros_like(vy))
        said = threshold_decisions(sv, sg, sm, vv, vg, groups)
        results.append(
            AttackResult(name, balanced_accuracy(said, vm), vv, vm, decisions=said, accuracy_kind="balanced")
        )
    return results


@register("nn", ["NN"])
def nn_probs(shadow, victim, num_cls, progress=Progress(), semantics="release", options=None):
    return _nn_attack(
        "NN", "mia_fc", lambda o: o.probs, shadow, victim, num_cls, progress, nn_schedule(semantics, options)
    )


@register("nn_top3", ["Top3-NN"])
def nn_top3(shadow, victim, num_cls, progress=Progress(), semantics="release", options=None):
    top3 = lambda o: o.probs.topk(3, dim=1).values
    return _nn_attack("Top3-NN", "mia_fc", top3, shadow, victim, num_cls, progress, nn_schedule(semantics, options))


@register("nn_cls", ["NNCl"])
def nn_cls(shadow, victim, num_cls, progress=Progress(), semantics="release", options=None):
    feats = lambda o: torch.cat([o.probs, _onehot(o, num_cls)], 1)
    return _nn_attack("NNCl", "mia_fc", feats, shadow, victim, num_cls, progress, nn_schedule(semantics, options))


# ---------------------------------------------------------------- offline LiRA

# Shadows before per-sample variances replace the pooled one. On digits (bench/bench_shadows.py) per-sample
# variances lost to the pooled one at every count from 2 to 64 (by 0.004-0.017 AUC), so they start above the
# measured range.
LIRA_PER_SAMPLE_VAR_MIN = 128


def logit_confidence(logits, labels):
    """log(p_y / (1 - p_y)) computed from logits as z_y - logsumexp_{j != y} z_j: no 1 - p_y
    cancellation, no clamping, exact for confidences that round to 1 in float32."""
    z = logits.double()
    rows = torch.arange(len(labels), device=z.device)
    others = z.clone()
    others[rows, labels] = -torch.inf
    return z[rows, labels] - torch.logsumexp(others, dim=1)


def lira_scores(shadow_values, victim_values, per_sample: bool = None):
    """Offline LiRA (Carlini et al. 2022). shadow_values (S, N): each shadow's log-odds on the
    victim's samples, all OUT (no shadow trained on them). Fit N(mu_i, var) per sample and score
    -log P[OUT >= victim value]: higher = member. The variance is pooled over all samples unless
    per_sample (by default: from LIRA_PER_SAMPLE_VAR_MIN shadows on; per-sample variances from a few shadows
    are too noisy); one shadow has no spread around its own mean, so it falls back to the spread over samples."""
    count = shadow_values.shape[0]
    mean = shadow_values.mean(0)
    per_sample = count >= LIRA_PER_SAMPLE_VAR_MIN if per_sample is None else per_sample
    if per_sample and count > 1:
        var = shadow_values.var(0)
    elif count > 1:
        var = ((shadow_values - mean) ** 2).sum() / (shadow_values.shape[1] * (count - 1))
    else:
        var = shadow_values.var()
    z = (victim_values - mean) / var.clamp_min(1e-12).sqrt()
    return -torch.special.log_ndtr(-z)  # -log of the upper tail, stable far into it


@register("lira", ["LiRA"], needs_shadow_logits=True)
def lira(shadow, victim, num_cls, progress=Progress(), semantics="release", options=None):
    """Offline LiRA. Its accuracy is the best balanced accuracy over thresholds chosen on the victim
    (as the LiRA paper reports it), an upper bound rather than a shadow-calibrated accuracy."""
    shadow_values = torch.stack([logit_confidence(z, victim.labels) for z in victim.shadow_logits])
    scores = lira_scores(shadow_values, logit_confidence(victim.logits, victim.labels)).cpu().numpy()
    member = victim.member.cpu().numpy()
    return [AttackResult("LiRA", best_balanced_accuracy(scores, member), scores, member)]


# ---------------------------------------------------------------- offline RMIA

RMIA_A_GRID = tuple(i / 10 for i in range(11))  # a = 0, 0.1, ..., 1
RMIA_TUNE_SHADOW = 0  # the shadow attacked (with the other shadows as references) to pick a


@dataclass
class References:
    """What RMIA compares: every model's softmax probability of the true label on a set of rows (model 0 the
    victim, model 1 + i shadow i), and, from the split, which rows each model trained on and attacks."""

    rows: np.ndarray  # (R,) rows of the index space: training-set rows, then test-set rows from n_train on
    n_train: int
    prob: np.ndarray  # (1 + S, R) float64
    trained: np.ndarray  # (1 + S, R) bool: the row is among the model's members
    attacked: list  # per model, positions (into rows) of its attacked samples in attack order

    @staticmethod
    def all_rows(victim_split, n_rows: int) -> np.ndarray:
        """Every row of the index space, the victim's attacked rows first (in attack order)."""
        first = attacked_rows(victim_split).cpu().numpy()
        rest = np.ones(n_rows, dtype=bool)
        rest[first] = False
        return np.concatenate([first, np.flatnonzero(rest)]).astype(np.int64)

    @classmethod
    def from_split(cls, splits, rows: np.ndarray, n_train: int, prob) -> "References":
        """splits: the victim's ModelSplit, then shadow i's; prob (1 + S, len(rows)) in the same model order."""
        position = np.full(int(rows.max()) + 1, -1, dtype=np.int64)
        position[rows] = np.arange(len(rows))
        trained = np.zeros((len(splits), len(rows)), dtype=bool)
        for m, s in enumerate(splits):
            trained[m, position[s.train.cpu().numpy()]] = True
        attacked = [position[attacked_rows(s).cpu().numpy()] for s in splits]
        return cls(rows, n_train, np.asarray(prob, dtype=np.float64), trained, attacked)

    def population(self, target: int) -> np.ndarray:
        """Positions of the z samples for model `target`: test-set rows no model trained on, outside the
        target's attacked samples."""
        free = (self.rows >= self.n_train) & ~self.trained.any(0)
        free[self.attacked[target]] = False
        return np.flatnonzero(free)


def rmia_ratio(target_prob, reference_prob, reference_out, a):
    """p(x|target) / p(x), p(x) = (1 + a) / 2 * mean over OUT references of p(x|ref) + (1 - a) / 2; nan where a
    sample has no OUT reference. target_prob (N,), reference_prob and reference_out (K, N)."""
    count = reference_out.sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        out_mean = np.where(reference_out, reference_prob, 0.0).sum(0) / count
    p = (1 + a) / 2 * out_mean + (1 - a) / 2
    return np.where(count > 0, target_prob / p, np.nan)


def rmia_pairwise(ratio_x, ratio_z, gamma, chunk=1 << 22):
    """score(x) = the fraction of z with ratio(x) / ratio(z) > gamma, the literal quotient (in row chunks)."""
    step = max(1, chunk // max(1, len(ratio_z)))
    with np.errstate(invalid="ignore", divide="ignore"):
        parts = [(ratio_x[i : i + step, None] / ratio_z[None, :] > gamma).mean(1) for i in range(0, len(ratio_x), step)]
    scores = np.concatenate(parts) if parts else np.zeros(0)
    return np.where(np.isnan(ratio_x), np.nan, scores)


def rmia_attack_model(refs: References, target: int, references: list, a: float, gamma: float) -> tuple:
    """(scores, member, has_out) of model `target`'s attacked samples with the models `references` as
    reference models; membership of every reference on every sample from refs.trained."""
    x, z = refs.attacked[target], refs.population(target)
    if len(z) == 0:
        raise UsageError(
            "RMIA has no population samples (test-set rows outside every model's training and "
            "the attacked samples); the split leaves none, see docs/attacks.md"
        )
    ref_prob, ref_out = refs.prob[references], ~refs.trained[references]
    ratio_x = rmia_ratio(refs.prob[target, x], ref_prob[:, x], ref_out[:, x], a)
    ratio_z = rmia_ratio(refs.prob[target, z], ref_prob[:, z], ref_out[:, z], a)
    return rmia_pairwise(ratio_x, ratio_z, gamma), refs.trained[target, x], ref_out[:, x].any(0)


def rmia_tune(refs: References, gamma: float) -> tuple:
    """(a, [AUC per a], (scores, member) at that a): attack shadow RMIA_TUNE_SHADOW with the other shadows
    as references for every a in RMIA_A_GRID, over its samples with at least one OUT reference; the best
    AUC wins (the smallest a on a tie)."""
    target = 1 + RMIA_TUNE_SHADOW
    others = [m for m in range(1, len(refs.prob)) if m != target]
    aucs, runs = [], []
    for a in RMIA_A_GRID:
        scores, member, has_out = rmia_attack_model(refs, target, others, a, gamma)
        kinds = set(member[has_out].tolist())
        if len(kinds) < 2:
            what = "none" if not kinds else "only members" if True in kinds else "only non-members"
            raise UsageError(
                f"RMIA cannot tune a: shadow {RMIA_TUNE_SHADOW}'s samples with an OUT reference among "
                f"the other shadows are {what}; use more shadows (--shadow_num)"
            )
        aucs.append(roc_metrics(scores[has_out], member[has_out])[0])
        runs.append((scores[has_out], member[has_out]))
    best = int(np.argmax(aucs))
    return RMIA_A_GRID[best], aucs, runs[best]


@register("rmia", ["RMIA"], needs_references=True, min_shadows=2)
def rmia(shadow, victim, num_cls, progress=Progress(), semantics="release", options=None):
    """Offline RMIA (Zarifzadeh et al. 2024), a tuned on a shadow. Its accuracy is shadow-calibrated: the
    threshold with the best balanced accuracy on the tuning shadow's scores, applied to the victim's."""
    refs, gamma = victim.references, getattr(options, "rmia_gamma", RMIA_GAMMA)
    a, aucs, (tune_scores, tune_member) = rmia_tune(refs, gamma)
    scores, member, _ = rmia_attack_model(refs, 0, list(range(1, len(refs.prob))), a, gamma)
    if not np.array_equal(member, victim.member.cpu().numpy()):
        raise ValueError("RMIA's victim samples are not in the attack's order")
    cut = best_threshold(tune_scores[tune_member], tune_scores[~tune_member])
    said = scores >= cut
    accuracy = balanced_accuracy(said, member)
    notes = [
        f"RMIA a: {a:g} (AUC {aucs[RMIA_A_GRID.index(a)]:.4f} on shadow {RMIA_TUNE_SHADOW}'s "
        f"{len(tune_member)} samples with an OUT reference, {int(tune_member.sum())} members), gamma {gamma:g}, "
        f"{len(refs.population(0))} population samples"
    ]
    return [AttackResult("RMIA", accuracy, scores, member, notes, decisions=said, accuracy_kind="balanced")]
