"""Defenses: each is one fine-tuning epoch under a rule, registered by name (docs/defenses.md).

A defense is built once per model being pruned (victim or shadow) and lives through every pruning
iteration, so its optimizers keep their state. To add one, subclass Defense, set `name`, implement
`train_epoch(epoch)` and decorate with @register; `--defend <name>` then works in prune_modi.py and
mia_modi.py, and summarize.py and the grids read the registry. `epoch` restarts at 0 every pruning
iteration. What a defense may read from the command line is DefenseSettings, nothing else.
"""

import argparse
import math
import warnings
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

from auto_settings import AUTO, float_or_auto, int_or_auto, window_rule
from common import UsageError
from dp import dp_gradient
from models import build_attack_model
from paths import model_prefix
from search_space import QUANTILE, SMALLEST_CLASS, Knob
from train import make_optimizer, minibatches, train_pass

DEFENSES = {}
SEMANTICS = ("release", "corrected")


def register(cls):
    DEFENSES[cls.name] = cls
    return cls


def get_defense(name: str) -> type:
    """The Defense class registered as name; '' and 'base' both mean no defense."""
    name = name or "base"
    if name not in DEFENSES:
        raise UsageError(f"unknown defense '{name}'; valid: {', '.join(DEFENSES)}")
    return DEFENSES[name]


def add_defense_flags(parser: argparse.ArgumentParser) -> None:
    """The defense flags, the same in prune_modi.py and mia_modi.py (mia_modi.py needs them to find the
    pruned models and to say how to make them)."""
    parser.add_argument("--defend", default="", help=f"'' (Base) or one of: {', '.join(DEFENSES)}")
    parser.add_argument("--defend_arg", type=float, default=4, help="the baselines' argument (docs/defenses.md)")
    parser.add_argument(
        "--dp_microbatch",
        type=int,
        default=None,
        help="dp: examples per clipped microbatch (default batch_size//2; 1 = per-example)",
    )
    parser.add_argument("--stride", type=int_or_auto, default=None, help="window step (slide defenses), or auto")
    parser.add_argument("--width", type=int_or_auto, default=None, help="window width (slide defenses), or auto")
    parser.add_argument("--weight_decay_mem", type=float, default=5e-4, help="risk-side weight decay (ml2)")
    parser.add_argument("--mem_thre", type=float_or_auto, default=0.6, help="mem-score threshold (ml2), or auto")
    parser.add_argument(
        "--semantics",
        choices=SEMANTICS,
        default="release",
        help="release: the paper's code as released (default); corrected: our fixes (docs/differences.md)",
    )


@dataclass(frozen=True)
class DefenseSettings:
    """What a defense reads from the command line and the config (defaults: the scripts' flag defaults;
    the config's values have none that fits every dataset, so these are digits')."""

    defend_arg: float = 4.0
    stride: int = None
    width: int = None
    weight_decay_mem: float = 5e-4
    mem_thre: float = 0.6
    dp_microbatch: int = None
    optimizer: str = "adam"
    lr: float = 1e-3
    weight_decay: float = 5e-4
    batch_size: int = 128
    num_cls: int = 10
    prune_epochs: int = 21
    epochs: int = 100  # the config's training epochs (the release's DP steps per epoch scale with it)
    semantics: str = "corrected"  # the scripts default to "release"

    @classmethod
    def from_args(cls, args) -> "DefenseSettings":
        return cls(**{field.name: getattr(args, field.name) for field in fields(cls)})


class Defense:
    name = None
    label = None  # the name in "Total <label> defend time"; defaults to `name`
    arg_in_name = False  # --defend_arg is part of the result-folder and log names
    window = False  # uses --stride/--width (written into the log header)
    needs_memscore = False
    semantics_differ = False  # --semantics changes how it trains, so corrected runs get their own names
    baseline = False  # one of the defenses the paper compares WeMeM against (the audit's "best baseline")
    derivable = ()  # the settings it reads that `auto` derives from the data (auto_settings.py)
    search_space = ()  # the Knobs that audit.py tune searches (search_space.py); none: nothing to tune

    def __init__(self, model, data, split, settings: DefenseSettings, memscores=None):
        self.model, self.data, self.split, self.settings = model, data, split, settings
        self.memscores = memscores
        self.optimizer = make_optimizer(model.parameters(), settings.optimizer, settings.lr, settings.weight_decay)

    @classmethod
    def check_args(cls, settings: DefenseSettings) -> None:
        """Raise UsageError for flags this defense cannot run with."""

    @classmethod
    def forced_flags(cls, semantics: str) -> dict:
        """Pruning flags this defense runs with whatever the command line says ({flag: value}); prune_modi.py
        applies them and logs each one it overrides."""
        return {}

    @classmethod
    def check_memscores(cls, scores: torch.Tensor, settings: DefenseSettings, path: str) -> None:
        """Raise UsageError when the settings do not fit the mem-scores (loaded from path)."""

    @classmethod
    def auto_flags(cls, args) -> list:
        """The settings of derivable that args (the flags, or a grid's setting) gives as auto."""
        return [flag for flag in cls.derivable if getattr(args, flag, None) == AUTO]

    @classmethod
    def prefix(cls, pruner_name, sparsity, defend_arg, semantics="release", auto=False) -> str:
        """The release's name of a run pruned with this defense, e.g. iter_pruning_0.6_ppb_4.0; auto (a setting
        given as auto) adds '_auto' after the defense, and a defense that trains differently under --semantics
        corrected gets '_corrected' after it."""
        name = model_prefix(pruner_name, sparsity, cls.name, defend_arg if cls.arg_in_name else None, auto)
        return name + "_corrected" if cls.semantics_differ and semantics == "corrected" else name

    @classmethod
    def header_lines(
        cls,
        settings: DefenseSettings,
        labels: torch.Tensor,
        scores: torch.Tensor = None,
        train_scores: torch.Tensor = None,
    ) -> list:
        """Lines for the log header of a run: what the settings mean on this data. labels: the victim's
        training labels; scores: their mem-scores, train_scores: the whole training set's (None without)."""
        return []

    def train_epoch(self, epoch: int) -> tuple:
        """Train one epoch; return (train loss, train accuracy %)."""
        raise NotImplementedError

    def iteration_summary(self) -> str:
        """An extra log line after each pruning iteration, or None."""
        return None


@register
class Base(Defense):
    """No defense: one plain shuffled epoch of cross-entropy."""

    name = "base"
    label = "Base"

    def train_epoch(self, epoch):
        return train_pass(self.model, self.data, self.split.train, self.optimizer, self.settings.batch_size)


# ---------------------------------------------------------------- the paper's defenses (mem-scores)


def class_orderings(idx, labels, scores=None, descending=True):
    """idx grouped by class (ascending label; labels[j] is idx[j]'s). Within a class: sorted by scores[idx]
    with a stable sort (ties keep list order), or in list order when scores is None."""
    groups = []
    for label in labels.unique(sorted=True):
        members = idx[labels == label]
        if scores is not None:
            members = members[torch.sort(scores[members], descending=descending, stable=True).indices]
        groups.append(members)
    return groups


def window_at(groups, stride, width, epoch, shared_end=False):
    """Positions [stride*epoch, stride*epoch + width) of every class, concatenated in class order.
    shared_end=False (corrected): each class is clipped to its own length. shared_end=True (release):
    one `end` for all classes, walked in class order: a class the window has passed (start >= its
    length) is skipped first, and only a class that is not lowers the shared end to its length, so a
    short class shortens the windows of the classes after it until the window has passed it."""
    start, end = stride * epoch, stride * epoch + width
    parts = []
    for group in groups:
        if shared_end:
            if start >= len(group):
                continue
            end = min(end, len(group))
        parts.append(group[start:end])
    return torch.cat(parts) if parts else groups[0][:0]


class WindowDefense(Defense):
    """RSW: each epoch trains on a window per class over the class's samples ordered by mem-score;
    the window moves by --stride every epoch and restarts every pruning iteration. The windows'
    ends follow window_at: one end shared by all classes under release, per class under corrected."""

    window = True
    needs_memscore = True
    semantics_differ = True
    derivable = ("stride", "width")
    search_space = (  # `auto` is 0.02 and 0.22 of the smallest class
        Knob("stride", 0.01, 0.2, log=True, unit=SMALLEST_CLASS),
        Knob("width", 0.05, 0.6, log=True, unit=SMALLEST_CLASS),
    )
    descending = True  # True: high -> low mem-score, False: low -> high, None: training-list order

    def __init__(self, model, data, split, settings, memscores=None):
        super().__init__(model, data, split, settings, memscores)
        scores = None if self.descending is None else memscores.to(split.train.device)
        self.groups = class_orderings(split.train, data.y[split.train], scores, bool(self.descending))
        self.check_windows()

    def check_windows(self):
        """Under release, refuse a setting whose window passes every class before the last epoch: the
        release's prune script stops at such an epoch (its DataLoader gets no sample). Under corrected
        such an epoch trains nothing (train_epoch)."""
        if self.settings.semantics == "release":
            self.refuse_passed_windows(
                ", where the release's prune script stops (its DataLoader gets no sample)",
                ", or pass --semantics corrected (such an epoch then trains nothing)",
            )

    def refuse_passed_windows(self, why="", other_fix=""):
        """UsageError when the last epoch's window is empty. Under both rules a class gives nothing exactly
        when the window has passed it, so the windows are empty from the epoch whose start passes the
        largest class on: checking the last covers all."""
        last = self.settings.prune_epochs - 1
        if len(self.window_indices(last)) == 0:
            raise UsageError(
                f"--defend {self.name}: the window of epoch {last} starts at {self.settings.stride * last}, "
                f"past every class (the largest has {max(len(group) for group in self.groups)} "
                f"samples){why}; lower --stride or --prune_epochs{other_fix}"
            )

    @classmethod
    def check_args(cls, settings):
        super().check_args(settings)
        for flag, value in (("stride", settings.stride), ("width", settings.width)):
            if value != AUTO and (value is None or value < 1):
                raise UsageError(
                    f"--defend {cls.name} needs --stride and --width of at least 1 "
                    f"(got --{flag} {value}); e.g. --stride 1 --width 15"
                )

    @classmethod
    def header_lines(cls, settings, labels, scores=None, train_scores=None):
        sizes = labels.unique(return_counts=True)[1].tolist()
        return super().header_lines(settings, labels, scores, train_scores) + [
            window_rule(sizes, settings.stride, settings.width, settings.prune_epochs)
        ]

    def window_indices(self, epoch):
        """This epoch's window: window_at with a shared end under release, per-class ends under corrected."""
        return window_at(
            self.groups,
            self.settings.stride,
            self.settings.width,
            epoch,
            shared_end=self.settings.semantics == "release",
        )

    def train_epoch(self, epoch):
        idx = self.window_indices(epoch)
        if len(idx) == 0:  # past every class (corrected only: check_windows refuses it under release)
            return float("nan"), float("nan")
        return train_pass(self.model, self.data, idx, self.optimizer, self.settings.batch_size)


@register
class Slide(WindowDefense):
    """RSW(H->L)."""

    name = "slide"


@register
class SlideRe(WindowDefense):
    """RSW(L->H)."""

    name = "slide_re"
    descending = False


@register
class RandomWindow(WindowDefense):
    """Ablation: the same windows over each class in its training-list order, no mem-scores."""

    name = "random"
    descending = None
    needs_memscore = False


class RiskMemory(Defense):
    """RMR: risk samples (mem-score >= --mem_thre) get one pass with their own optimizer, whose weight
    decay is --weight_decay_mem; then the general samples get one pass with the normal optimizer."""

    needs_memscore = True
    derivable = ("mem_thre",)
    search_space = (Knob("mem_thre", 0.8, 0.99, unit=QUANTILE), Knob("weight_decay_mem", 1e-4, 1.0, log=True))

    def __init__(self, model, data, split, settings, memscores=None):
        super().__init__(model, data, split, settings, memscores)
        self.scores = memscores.to(split.train.device)
        self.risk_optimizer = make_optimizer(
            model.parameters(), settings.optimizer, settings.lr, settings.weight_decay_mem
        )

    @classmethod
    def check_args(cls, settings):
        super().check_args(settings)
        if not settings.weight_decay_mem >= 0:
            raise UsageError(f"--weight_decay_mem must be >= 0, got {settings.weight_decay_mem}")
        if settings.mem_thre != AUTO and not math.isfinite(settings.mem_thre):
            raise UsageError(f"--mem_thre must be a number, got {settings.mem_thre}")

    @classmethod
    def check_memscores(cls, scores, settings, path):
        super().check_memscores(scores, settings, path)
        low, high = scores.min().item(), scores.max().item()
        if not low <= settings.mem_thre <= high:
            raise UsageError(
                f"--mem_thre {settings.mem_thre} is outside the mem-scores' range [{low:.3f}, {high:.3f}] "
                f"({path}); pick a value inside it"
            )

    @classmethod
    def header_lines(cls, settings, labels, scores=None, train_scores=None):
        """How many samples --mem_thre puts on the risk side, and a warning when it is more than half of the
        training set: the risk side is meant to be a tail of high scores (docs/defenses.md)."""
        risky, n = int((train_scores >= settings.mem_thre).sum()), len(train_scores)
        lines = [
            f"Risk side: {risky} of {n} training samples ({100 * risky / n:.1f}%) have a mem-score >= "
            f"--mem_thre {settings.mem_thre:g}; the victim's: {int((scores >= settings.mem_thre).sum())} "
            f"of {len(scores)}"
        ]
        if 2 * risky > n:
            lines.append(
                f"Warning: --mem_thre {settings.mem_thre:g} puts more than half of the training set on the "
                f"risk side; it is meant to mark a tail of high mem-scores: choose it from the scores' "
                f"distribution (docs/defenses.md)"
            )
        return super().header_lines(settings, labels, scores, train_scores) + lines

    def risk_split(self, idx):
        """(risk, general): the indices with mem-score >= --mem_thre and the rest, in list order."""
        risky = self.scores[idx] >= self.settings.mem_thre
        return idx[risky], idx[~risky]

    def train_risk_then_general(self, idx, epoch):
        """One pass over the risk side (risk optimizer), then one over the general side; an empty side is
        skipped. Returns the sample-weighted (loss, accuracy %) of the passes."""
        sides = [
            (part, opt) for part, opt in zip(self.risk_split(idx), (self.risk_optimizer, self.optimizer)) if len(part)
        ]
        if not sides:
            raise UsageError(
                f"--defend {self.name}: epoch {epoch} has no sample on either side of --mem_thre "
                f"(the window is past every class); lower --stride or --prune_epochs"
            )
        results = [
            (len(part), *train_pass(self.model, self.data, part, opt, self.settings.batch_size)) for part, opt in sides
        ]
        total = sum(n for n, _, _ in results)
        return (sum(n * loss for n, loss, _ in results) / total, sum(n * acc for n, _, acc in results) / total)


@register
class ML2(RiskMemory):
    """RMR over the whole training set."""

    name = "ml2"

    def train_epoch(self, epoch):
        return self.train_risk_then_general(self.split.train, epoch)


class WindowRiskMemory(RiskMemory, WindowDefense):
    """SWMR: this epoch's RSW window (under either semantics' rule, see window_at), then RMR on it.
    A setting whose last epoch's window is empty under that rule is refused when it is built, under both
    semantics: an epoch without a sample on either side of --mem_thre has nothing to train."""

    derivable = ("stride", "width", "mem_thre")
    search_space = WindowDefense.search_space + RiskMemory.search_space

    def check_windows(self):
        self.refuse_passed_windows()

    def train_epoch(self, epoch):
        return self.train_risk_then_general(self.window_indices(epoch), epoch)


@register
class SlideML2(WindowRiskMemory):
    """SWMR(H->L)."""

    name = "slide_ml2"


@register
class SlideReML2(WindowRiskMemory):
    """SWMR(L->H)."""

    name = "slide_re_ml2"
    descending = False


# ---------------------------------------------------------------- baselines the paper compares against


def check_defend_arg(cls, settings, minimum, strict, meaning):
    """One-line UsageError unless minimum < defend_arg (strict) or minimum <= defend_arg, and finite."""
    value = settings.defend_arg
    ok = math.isfinite(value) and (value > minimum if strict else value >= minimum)
    if not ok:
        bound = f"> {minimum}" if strict else f">= {minimum}"
        raise UsageError(f"--defend {cls.name} needs --defend_arg {bound} ({meaning}), got {value}")


def ppb_kl(logits):
    """PPB's balancing term: rows sorted descending, first half vs second half (an odd last row is
    dropped), KL(softmax(second) || softmax(first)) averaged over the pairs."""
    half = len(logits) // 2
    if half == 0:
        return logits.sum() * 0
    ranked = logits.sort(dim=1, descending=True).values
    return F.kl_div(F.log_softmax(ranked[:half], 1), F.softmax(ranked[half : 2 * half], 1), reduction="batchmean")


def ppb_loss(logits, y, weight):
    return F.cross_entropy(logits, y) + weight * ppb_kl(logits)


class LossDefense(Defense):
    """A plain epoch over the training set with its own loss(logits, y, epoch)."""

    arg_in_name = True
    baseline = True

    def loss(self, logits, y, epoch):
        raise NotImplementedError

    def train_epoch(self, epoch):
        return train_pass(
            self.model,
            self.data,
            self.split.train,
            self.optimizer,
            self.settings.batch_size,
            loss_fn=lambda logits, y: self.loss(logits, y, epoch),
        )


@register
class Ppb(LossDefense):
    """Pair-wise posterior balancing (Yuan & Zhang, USENIX Security 2022); defend_arg weighs the KL term."""

    name = "ppb"
    search_space = (Knob("defend_arg", 0.5, 32.0, log=True),)  # the paper's grid: 1-16

    @classmethod
    def check_args(cls, settings):
        check_defend_arg(cls, settings, 0, False, "the weight of the KL term")

    def loss(self, logits, y, epoch):
        return ppb_loss(logits, y, self.settings.defend_arg)


def relaxloss_loss(logits, y, alpha, epoch):
    """RelaxLoss (Chen et al. 2022). Even epochs: |mean CE - alpha|. Odd epochs: plain CE while the
    mean CE is above alpha, else posterior flattening on the misclassified samples. The soft targets
    keep their gradient, as in the release and the original RelaxLoss code."""
    ce = F.cross_entropy(logits, y, reduction="none")
    mean_ce = ce.mean()
    if epoch % 2 == 0:
        return (mean_ce - alpha).abs()
    num_cls = logits.shape[1]
    p_true = F.softmax(logits, 1).gather(1, y[:, None]).squeeze(1)  # not detached, as in RelaxLoss's code
    soft = ((1 - p_true) / (num_cls - 1))[:, None].repeat(1, num_cls)
    soft.scatter_(1, y[:, None], p_true[:, None])
    soft_ce = -(soft * F.log_softmax(logits, 1)).sum(1)
    wrong = (logits.argmax(1) != y).float()
    flattened = (wrong * soft_ce - ce).mean()
    return torch.where(mean_ce > alpha, mean_ce, flattened)  # no host sync for the branch


@register
class RelaxLoss(LossDefense):
    """RelaxLoss (Chen et al., ICLR 2022); defend_arg is the target loss level alpha."""

    name = "relaxloss"
    search_space = (Knob("defend_arg", 0.05, 2.0, log=True),)  # alpha, a cross-entropy level

    @classmethod
    def check_args(cls, settings):
        check_defend_arg(cls, settings, 0, True, "the target loss level alpha")

    def loss(self, logits, y, epoch):
        return relaxloss_loss(logits, y, self.settings.defend_arg, epoch)


def inference_features(logits, y):
    """What ADV's inference model sees: [softmax(logits), one-hot label]."""
    return torch.cat([F.softmax(logits, 1), F.one_hot(y, logits.shape[1]).to(logits.dtype)], 1)


def adv_classifier_loss(logits, y, inference, theta):
    """CE - theta * CE(inference(train features), member): the classifier is rewarded when the
    inference model fails to call its training batch members (Nasr et al. 2018)."""
    inference.eval()
    member_logits = inference(inference_features(logits, y))
    members = torch.ones(len(y), dtype=torch.long, device=y.device)
    return F.cross_entropy(logits, y) - theta * F.cross_entropy(member_logits, members)


def cycled_batches(idx, batch_size, shuffle):
    """Batches of passes over idx, one pass after another without end, as a loader restarted each
    time it runs out: each pass in list order or reshuffled (global torch RNG, drawn when the pass
    starts), a short last batch in each."""
    while True:
        yield from minibatches(idx, batch_size, shuffle)


@register
class Adv(Defense):
    """Adversarial regularization (Nasr et al., CCS 2018); defend_arg is privacy_theta. The inference
    model and its optimizer live across epochs and pruning iterations. An epoch under release: 7
    inference steps, their member batches from a shuffled pass over the training set and their dev
    batches from the dev set in order, each restarted (reshuffled) when it runs out (a dev set of 2
    batches gives 0,1,0,1,0,1,0), then one classifier step on one random training batch. Under
    corrected: a full shuffled epoch with 7 inference steps (random training and dev batches, drawn
    independently) before every classifier step."""

    name = "adv"
    arg_in_name = True
    baseline = True
    search_space = (Knob("defend_arg", 0.5, 16.0, log=True),)  # the paper's grid: 1-8
    semantics_differ = True
    inference_steps = 7  # per classifier step (corrected) or per epoch (release)

    def __init__(self, model, data, split, settings, memscores=None):
        super().__init__(model, data, split, settings, memscores)
        self.inference = build_attack_model("mia_fc", 2 * settings.num_cls, settings.num_cls).to(data.y.device)
        self.inference_optimizer = torch.optim.Adam(self.inference.parameters(), lr=1e-3, weight_decay=5e-4)

    @classmethod
    def check_args(cls, settings):
        check_defend_arg(cls, settings, 0, True, "privacy_theta, the weight of the inference game")

    def random_batch(self, idx):
        return idx[torch.randperm(len(idx), device=idx.device)[: self.settings.batch_size]]

    @torch.no_grad()
    def features(self, idx):
        """The classifier's outputs as an attacker sees them (eval mode)."""
        was_training = self.model.training
        self.model.eval()
        x, y = self.data.batch(idx)
        features = inference_features(self.model(x), y)
        self.model.train(was_training)
        return features

    def inference_step(self, members=None, others=None):
        """One step on the training indices `members` (label 1) against the dev indices `others`
        (label 0); a random training or dev batch where None."""
        members = self.features(self.random_batch(self.split.train) if members is None else members)
        others = self.features(self.random_batch(self.split.dev) if others is None else others)
        labels = torch.cat([torch.ones(len(members)), torch.zeros(len(others))]).long().to(members.device)
        self.inference.train()
        loss = self.settings.defend_arg * F.cross_entropy(self.inference(torch.cat([members, others])), labels)
        self.inference_optimizer.zero_grad(set_to_none=True)  # also drops grads left by the classifier step
        loss.backward()
        self.inference_optimizer.step()
        return loss.item()

    def train_inference_model(self):
        for _ in range(self.inference_steps):
            self.inference_step()

    def train_epoch(self, epoch):
        """Release: 7 inference steps, then one classifier step; returns that batch's (loss, acc %).
        Corrected: a full epoch, 7 inference steps before each classifier step."""
        theta, batch_size = self.settings.defend_arg, self.settings.batch_size
        loss_fn = lambda logits, y: adv_classifier_loss(logits, y, self.inference, theta)
        if self.settings.semantics == "release":
            # the release restarts its member and dev loaders whenever they run out, fresh every epoch
            members = cycled_batches(self.split.train, batch_size, shuffle=True)
            others = cycled_batches(self.split.dev, batch_size, shuffle=False)
            for _ in range(self.inference_steps):
                self.inference_step(next(members), next(others))
            return train_pass(
                self.model, self.data, self.random_batch(self.split.train), self.optimizer, batch_size, loss_fn=loss_fn
            )
        return train_pass(
            self.model,
            self.data,
            self.split.train,
            self.optimizer,
            batch_size,
            loss_fn=loss_fn,
            before_step=self.train_inference_model,
        )


@register
class Dp(Defense):
    """DP-SGD (Abadi et al., CCS 2016) with Poisson sampling and microbatch clipping; defend_arg is
    the noise multiplier sigma. Privacy spent is tracked with Opacus's RDP accountant, one step per
    Poisson draw. Release (the release's DP pruning script): SGD without momentum at the config's lr and
    weight decay, len(train)//batch_size * epochs draws per epoch, a draw that samples nobody skipped (no
    step), microbatches of batch_size//2 with the last partial one dropped, the summed clipped gradients
    scaled by microbatch/batch_size, the model's mode left alone (eval after the first evaluation), and
    always 5 pruning iterations of 21 epochs (forced_flags). Corrected: the config's optimizer,
    len(train)//batch_size steps, --dp_microbatch with partial microbatches kept, the scale
    microbatch/expected batch (min(batch_size, len(train)): the same as release's unless the training set
    is smaller than a batch, where every draw takes all of it), train mode every epoch, the command
    line's pruning flags."""

    name = "dp"
    arg_in_name = True
    baseline = True
    search_space = (Knob("defend_arg", 0.25, 16.0, log=True),)  # the noise multiplier
    semantics_differ = True
    clip = 1.0
    delta, delta_text = 1e-5, "1e-5"
    release_pruning = {"prune_iter": 5, "prune_epochs": 21}  # what the release's DP pruning script hard-codes

    def __init__(self, model, data, split, settings, memscores=None):
        super().__init__(model, data, split, settings, memscores)
        from opacus.accountants import RDPAccountant  # imported here: opacus is slow to import

        self.accountant = RDPAccountant()
        self.release = settings.semantics == "release"
        steps = len(split.train) // settings.batch_size
        if self.release:
            self.optimizer = torch.optim.SGD(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
            self.microbatch = max(1, settings.batch_size // 2)
            self.steps = max(1, steps * settings.epochs)
        else:
            self.microbatch = settings.dp_microbatch or max(1, settings.batch_size // 2)
            self.steps = max(1, steps)
        self.sample_rate = min(1.0, settings.batch_size / len(split.train))
        self.expected_batch = self.sample_rate * len(split.train)
        # the gradient's divisor: the release divides by its configured batch size even when the training set
        # is smaller (then every draw takes all n < batch_size samples, and the step shrinks by n/batch_size)
        self.divisor = settings.batch_size if self.release else self.expected_batch

    @classmethod
    def forced_flags(cls, semantics):
        return dict(cls.release_pruning) if semantics == "release" else {}

    @classmethod
    def check_args(cls, settings):
        check_defend_arg(cls, settings, 0, False, "the noise multiplier; 0 clips without noise")
        microbatch = settings.dp_microbatch
        if microbatch is not None and not 1 <= microbatch <= settings.batch_size:
            raise UsageError(f"--dp_microbatch must be in 1..--batch_size ({settings.batch_size}), got {microbatch}")
        if microbatch is not None and settings.semantics == "release":
            raise UsageError(
                f"--dp_microbatch is a --semantics corrected flag; --semantics release always uses "
                f"batch_size//2 ({max(1, settings.batch_size // 2)}), as the release does"
            )

    def train_epoch(self, epoch):
        """self.steps Poisson draws, a DP-SGD step on each (release: on each that sampled somebody); returns
        (loss, accuracy %) over the examples used. Corrected puts the model in train mode first; release
        trains in whatever mode it is in. The accountant counts every draw, skipped or not."""
        if not self.release:
            self.model.train()
        train, sigma = self.split.train, self.settings.defend_arg
        loss_sum, correct, seen = 0.0, 0, 0
        for _ in range(self.steps):
            batch = train[torch.rand(len(train), device=train.device) < self.sample_rate]
            self.accountant.step(noise_multiplier=sigma, sample_rate=self.sample_rate)
            if self.release and len(batch) == 0:
                continue
            x, y = self.data.batch(batch)
            batch_loss, batch_correct = dp_gradient(
                self.model, x, y, self.microbatch, self.divisor, self.clip, sigma, self.release
            )
            self.optimizer.step()
            used = len(batch) // self.microbatch * self.microbatch if self.release else len(batch)
            loss_sum, correct, seen = loss_sum + batch_loss, correct + batch_correct, seen + used
        seen = max(seen, 1)
        return float(loss_sum) / seen, 100.0 * float(correct) / seen

    def epsilon(self):
        """Epsilon at delta for every step so far (inf without noise)."""
        with warnings.catch_warnings():  # tiny sigmas make Opacus warn about its alpha grid
            warnings.simplefilter("ignore")
            return self.accountant.get_epsilon(delta=self.delta)

    def iteration_summary(self):
        return f"DP epsilon: {self.epsilon():.3f} (delta {self.delta_text})"
