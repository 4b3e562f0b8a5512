"""Defenses: each is one fine-tuning epoch under a rule, registered by name.

A defense is built once per model being pruned (victim or shadow) and lives through every pruning
iteration, so its optimizers keep their state. To add one, subclass Defense, set `name`, implement
`train_epoch(epoch)` and decorate with @register. `epoch` restarts at 0 every pruning iteration.
"""
import math
import os
import warnings

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from train import make_optimizer, train_pass
from common import MissingError, UsageError
from datasets import get_dataset
from models import build_attack_model
from paths import memscore_path

DEFENSES = {}


def register(cls):
    DEFENSES[cls.name] = cls
    return cls


def get_defense(name):
    """'' and 'base' both mean no defense."""
    name = name or "base"
    if name not in DEFENSES:
        raise UsageError(f"unknown defense '{name}'; valid: {', '.join(DEFENSES)}")
    return DEFENSES[name]


class Defense:
    name = None
    label = None              # the name in "Total <label> defend time"; defaults to `name`
    arg_in_name = False       # --defend_arg is part of the result-folder and log names
    window = False            # uses --stride/--width (written into the log header)
    needs_memscore = False

    def __init__(self, model, data, split, args, memscores=None):
        self.model, self.data, self.split, self.args = model, data, split, args
        self.memscores = memscores
        self.optimizer = make_optimizer(model.parameters(), args.optimizer, args.lr, args.weight_decay)

    @classmethod
    def check_args(cls, args):
        """Raise UsageError for flags this defense cannot run with."""

    @classmethod
    def load_memscores(cls, args, n_train=None):
        """Mem-scores of the config's training set (float64 tensor, row i = trainset index i). n_train,
        when known (the split records it), spares reading the dataset again to count its rows."""
        path, fix = memscore_path(args.dataset_name, args.model_name), memscore_fix(args)
        if not os.path.isfile(path):
            raise MissingError(f"mem-scores {path} not found; {fix}")
        if n_train is None:
            n_train = len(get_dataset(args.dataset_name)[0])
        return read_memscores(path, n_train, fix)

    def train_epoch(self, epoch):
        """Train one epoch; return (train loss, train accuracy %)."""
        raise NotImplementedError

    def iteration_summary(self):
        """An extra log line after each pruning iteration, or None."""
        return None


@register
class Base(Defense):
    """No defense: one plain shuffled epoch of cross-entropy."""
    name = "base"
    label = "Base"

    def train_epoch(self, epoch):
        return train_pass(self.model, self.data, self.split.train, self.optimizer, self.args.batch_size)


# ---------------------------------------------------------------- mem-scores (the paper's defenses)

AUTHORS_MEMSCORES = {(ds, model) for ds in ("cifar10", "cifar100", "cinic")
                     for model in ("resnet18", "densenet121", "vgg16bn")} | {("location", "columnfc")}


def memscore_fix(args):
    """How to get the mem-score file of this config: the authors' CSV where one exists, else compute it."""
    compute = f"compute it with python compute_memscore.py {args.gpu_id} {args.config_path} (README: Mem-scores)"
    if (args.dataset_name, args.model_name) in AUTHORS_MEMSCORES:
        return f"put the authors' published CSV there, or {compute}"
    return compute


def read_memscores(path, n_train, fix):
    """The authors' CSV (unnamed index column 0..n-1, one column named 0) -> float64 tensor, row i = trainset index i."""
    try:
        frame = pd.read_csv(path, index_col=0)
    except Exception as err:  # missing, empty, not a CSV
        raise MissingError(f"mem-scores {path} is not a readable CSV ({type(err).__name__}); {fix}")
    if list(frame.columns) != ["0"] or not pd.api.types.is_numeric_dtype(frame["0"]):
        raise MissingError(f"mem-scores {path} must hold an index column and one numeric column named 0; {fix}")
    if len(frame) != n_train:
        raise MissingError(f"mem-scores {path} has {len(frame)} rows but the training set has {n_train} samples "
                           f"(made for another dataset or split); {fix}")
    if not np.array_equal(frame.index.to_numpy(), np.arange(n_train)):
        raise MissingError(f"mem-scores {path}: the index column must count 0..{n_train - 1} in order; {fix}")
    scores = frame["0"].to_numpy(np.float64)
    if not np.isfinite(scores).all():
        raise MissingError(f"mem-scores {path}: row {int(np.argmin(np.isfinite(scores)))} is not a number; {fix}")
    return torch.tensor(scores)


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


def window_at(groups, stride, width, epoch):
    """Positions [stride*epoch, stride*epoch + width) of every class, each clipped to its own length
    (the release clips with one `end` shared by all classes; we do not), concatenated in class order."""
    start = stride * epoch
    return torch.cat([group[start:start + width] for group in groups])


class WindowDefense(Defense):
    """RSW: each epoch trains on a window per class over the class's samples ordered by mem-score;
    the window moves by --stride every epoch and restarts every pruning iteration."""
    window = True
    needs_memscore = True
    descending = True  # True: high -> low mem-score, False: low -> high, None: training-list order

    def __init__(self, model, data, split, args, memscores=None):
        super().__init__(model, data, split, args, memscores)
        scores = None if self.descending is None else memscores.to(split.train.device)
        self.groups = class_orderings(split.train, data.y[split.train], scores, bool(self.descending))

    @classmethod
    def check_args(cls, args):
        super().check_args(args)
        for flag in ("stride", "width"):
            value = getattr(args, flag)
            if value is None or value < 1:
                raise UsageError(f"--defend {cls.name} needs --stride and --width of at least 1 "
                                 f"(got --{flag} {value}); e.g. --stride 1 --width 15")

    def window_indices(self, epoch):
        return window_at(self.groups, self.args.stride, self.args.width, epoch)

    def train_epoch(self, epoch):
        idx = self.window_indices(epoch)
        if len(idx) == 0:  # the window has passed every class: this epoch trains nothing
            return float("nan"), float("nan")
        return train_pass(self.model, self.data, idx, self.optimizer, self.args.batch_size)


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

    def __init__(self, model, data, split, args, memscores=None):
        super().__init__(model, data, split, args, memscores)
        self.scores = memscores.to(split.train.device)
        self.risk_optimizer = make_optimizer(model.parameters(), args.optimizer, args.lr, args.weight_decay_mem)

    @classmethod
    def check_args(cls, args):
        super().check_args(args)
        if not args.weight_decay_mem >= 0:
            raise UsageError(f"--weight_decay_mem must be >= 0, got {args.weight_decay_mem}")
        if not math.isfinite(args.mem_thre):
            raise UsageError(f"--mem_thre must be a number, got {args.mem_thre}")

    @classmethod
    def load_memscores(cls, args, n_train=None):
        scores = super().load_memscores(args, n_train)
        low, high = scores.min().item(), scores.max().item()
        if not low <= args.mem_thre <= high:
            raise UsageError(f"--mem_thre {args.mem_thre} is outside the mem-scores' range [{low:.3f}, {high:.3f}] "
                             f"({memscore_path(args.dataset_name, args.model_name)}); pick a value inside it")
        return scores

    def risk_split(self, idx):
        """(risk, general): the indices with mem-score >= --mem_thre and the rest, in list order."""
        risky = self.scores[idx] >= self.args.mem_thre
        return idx[risky], idx[~risky]

    def train_risk_then_general(self, idx, epoch):
        """One pass over the risk side (risk optimizer), then one over the general side; an empty side is
        skipped. Returns the sample-weighted (loss, accuracy %) of the passes."""
        sides = [(part, opt) for part, opt in zip(self.risk_split(idx), (self.risk_optimizer, self.optimizer))
                 if len(part)]
        if not sides:
            raise UsageError(f"--defend {self.name}: epoch {epoch} has no sample on either side of --mem_thre "
                             f"(the window is past every class); lower --stride or --prune_epochs")
        results = [(len(part), *train_pass(self.model, self.data, part, opt, self.args.batch_size))
                   for part, opt in sides]
        total = sum(n for n, _, _ in results)
        return (sum(n * loss for n, loss, _ in results) / total, sum(n * acc for n, _, acc in results) / total)


@register
class ML2(RiskMemory):
    """RMR over the whole training set."""
    name = "ml2"

    def train_epoch(self, epoch):
        return self.train_risk_then_general(self.split.train, epoch)


class WindowRiskMemory(RiskMemory, WindowDefense):
    """SWMR: this epoch's RSW window, then RMR on it."""

    def __init__(self, model, data, split, args, memscores=None):
        super().__init__(model, data, split, args, memscores)
        last = args.prune_epochs - 1  # windows only shrink as they move, so check the last one up front
        if len(self.window_indices(last)) == 0:
            largest = max(len(group) for group in self.groups)
            raise UsageError(f"--defend {self.name}: the window of epoch {last} starts at {args.stride * last}, "
                             f"past every class (the largest has {largest} samples); lower --stride or --prune_epochs")

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

def check_defend_arg(cls, args, minimum, strict, meaning):
    """One-line UsageError unless minimum < defend_arg (strict) or minimum <= defend_arg, and finite."""
    value = args.defend_arg
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
    return F.kl_div(F.log_softmax(ranked[:half], 1), F.softmax(ranked[half:2 * half], 1), reduction="batchmean")


def ppb_loss(logits, y, weight):
    return F.cross_entropy(logits, y) + weight * ppb_kl(logits)


class LossDefense(Defense):
    """A plain epoch over the training set with its own loss(logits, y, epoch)."""
    arg_in_name = True

    def loss(self, logits, y, epoch):
        raise NotImplementedError

    def train_epoch(self, epoch):
        return train_pass(self.model, self.data, self.split.train, self.optimizer, self.args.batch_size,
                          loss_fn=lambda logits, y: self.loss(logits, y, epoch))


@register
class Ppb(LossDefense):
    """Pair-wise posterior balancing (Yuan & Zhang, USENIX Security 2022); defend_arg weighs the KL term."""
    name = "ppb"

    @classmethod
    def check_args(cls, args):
        check_defend_arg(cls, args, 0, False, "the weight of the KL term")

    def loss(self, logits, y, epoch):
        return ppb_loss(logits, y, self.args.defend_arg)


def relaxloss_loss(logits, y, alpha, epoch, upper=1.0):
    """RelaxLoss (Chen et al. 2022). Even epochs: |mean CE - alpha|. Odd epochs: plain CE while the
    mean CE is above alpha, else posterior flattening on the misclassified samples."""
    ce = F.cross_entropy(logits, y, reduction="none")
    mean_ce = ce.mean()
    if epoch % 2 == 0:
        return (mean_ce - alpha).abs()
    num_cls = logits.shape[1]
    p_true = F.softmax(logits, 1).gather(1, y[:, None]).squeeze(1).clamp(0, upper).detach()
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

    @classmethod
    def check_args(cls, args):
        check_defend_arg(cls, args, 0, True, "the target loss level alpha")

    def loss(self, logits, y, epoch):
        return relaxloss_loss(logits, y, self.args.defend_arg, epoch)


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


@register
class Adv(Defense):
    """Adversarial regularization (Nasr et al., CCS 2018); defend_arg is privacy_theta. The inference
    model and its optimizer live across epochs and pruning iterations."""
    name = "adv"
    arg_in_name = True
    inference_steps = 7   # inference-model steps before every classifier step

    def __init__(self, model, data, split, args, memscores=None):
        super().__init__(model, data, split, args, memscores)
        self.inference = build_attack_model("mia_fc", 2 * args.num_cls, args.num_cls).to(data.y.device)
        self.inference_optimizer = torch.optim.Adam(self.inference.parameters(), lr=1e-3, weight_decay=5e-4)

    @classmethod
    def check_args(cls, args):
        check_defend_arg(cls, args, 0, True, "privacy_theta, the weight of the inference game")

    def random_batch(self, idx):
        return idx[torch.randperm(len(idx), device=idx.device)[:self.args.batch_size]]

    @torch.no_grad()
    def features(self, idx):
        """The classifier's outputs as an attacker sees them (eval mode)."""
        was_training = self.model.training
        self.model.eval()
        x, y = self.data.batch(idx)
        features = inference_features(self.model(x), y)
        self.model.train(was_training)
        return features

    def inference_step(self):
        """One step on a random training batch (label 1) against a random dev batch (label 0)."""
        members = self.features(self.random_batch(self.split.train))
        others = self.features(self.random_batch(self.split.dev))
        labels = torch.cat([torch.ones(len(members)), torch.zeros(len(others))]).long().to(members.device)
        self.inference.train()
        loss = self.args.defend_arg * F.cross_entropy(self.inference(torch.cat([members, others])), labels)
        self.inference_optimizer.zero_grad(set_to_none=True)  # also drops grads left by the classifier step
        loss.backward()
        self.inference_optimizer.step()
        return loss.item()

    def train_inference_model(self):
        for _ in range(self.inference_steps):
            self.inference_step()

    def train_epoch(self, epoch):
        theta = self.args.defend_arg
        return train_pass(self.model, self.data, self.split.train, self.optimizer, self.args.batch_size,
                          loss_fn=lambda logits, y: adv_classifier_loss(logits, y, self.inference, theta),
                          before_step=self.train_inference_model)


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
        yield ({name: (torch.zeros_like(p) if g is None else g)[None] for (name, p), g in zip(params.items(), grads)},
               logits.detach(), yb)


def clipped_gradient_sum(model, x, y, microbatch, clip):
    """Sum over microbatches of each microbatch's mean-loss gradient, clipped to L2 norm <= clip.
    Returns (name -> summed gradient, summed loss, correct count)."""
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


def dp_gradient(model, x, y, microbatch, expected_batch, clip, sigma):
    """Set .grad to (sum of clipped microbatch gradients + N(0, (clip*sigma)^2)) * microbatch/expected_batch.
    Returns (summed loss, correct count) of the batch."""
    total, loss_sum, correct = clipped_gradient_sum(model, x, y, microbatch, clip)
    for name, p in model.named_parameters():
        noise = torch.randn_like(p) * (clip * sigma) if sigma > 0 else 0
        p.grad = (total[name] + noise) * (microbatch / expected_batch)
    return loss_sum, correct


@register
class Dp(Defense):
    """DP-SGD (Abadi et al., CCS 2016) with Poisson sampling and microbatch clipping; defend_arg is
    the noise multiplier sigma. Privacy spent is tracked with Opacus's RDP accountant."""
    name = "dp"
    arg_in_name = True
    clip = 1.0
    delta, delta_text = 1e-5, "1e-5"

    def __init__(self, model, data, split, args, memscores=None):
        super().__init__(model, data, split, args, memscores)
        from opacus.accountants import RDPAccountant  # imported here: opacus is slow to import
        self.accountant = RDPAccountant()
        self.microbatch = getattr(args, "dp_microbatch", None) or max(1, args.batch_size // 2)
        self.sample_rate = min(1.0, args.batch_size / len(split.train))
        self.expected_batch = self.sample_rate * len(split.train)

    @classmethod
    def check_args(cls, args):
        check_defend_arg(cls, args, 0, False, "the noise multiplier; 0 clips without noise")
        microbatch = getattr(args, "dp_microbatch", None)
        if microbatch is not None and not 1 <= microbatch <= args.batch_size:
            raise UsageError(f"--dp_microbatch must be in 1..--batch_size ({args.batch_size}), got {microbatch}")

    def train_epoch(self, epoch):
        self.model.train()
        train, sigma = self.split.train, self.args.defend_arg
        loss_sum, correct, seen = 0.0, 0, 0
        for _ in range(max(1, len(train) // self.args.batch_size)):
            batch = train[torch.rand(len(train), device=train.device) < self.sample_rate]
            x, y = self.data.batch(batch)
            batch_loss, batch_correct = dp_gradient(self.model, x, y, self.microbatch, self.expected_batch,
                                                    self.clip, sigma)
            self.optimizer.step()
            self.accountant.step(noise_multiplier=sigma, sample_rate=self.sample_rate)
            loss_sum, correct, seen = loss_sum + batch_loss, correct + batch_correct, seen + len(batch)
        seen = max(seen, 1)
        return float(loss_sum) / seen, 100.0 * float(correct) / seen

    def epsilon(self):
        """Epsilon at delta for every step so far (inf without noise)."""
        with warnings.catch_warnings():  # tiny sigmas make Opacus warn about its alpha grid
            warnings.simplefilter("ignore")
            return self.accountant.get_epsilon(delta=self.delta)

    def iteration_summary(self):
        return f"DP epsilon: {self.epsilon():.3f} (delta {self.delta_text})"
