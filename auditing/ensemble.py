"""Batched training of M models of one architecture as one ensemble: their parameters stacked along a leading
model dimension and run together (torch.func.functional_call under torch.func.vmap), for audits that train
many small models.

fit_ensemble gives model m what train.py's loop gives one model, step by step. One at a time, model m would be

    torch.manual_seed(seed_m)                       # generators[m] = torch.Generator().manual_seed(seed_m)
    optimizer = make_optimizer(model.parameters(), optimizer, lr, weight_decay)
    pruner = Pruner(model, ...); pruner.prune(i)    # only for masked fine-tuning: masks[m] = pruner.masks
    fit(model, lambda epoch: train_pass(model, data, train_idx[m], optimizer, batch_size), data, dev_idx[m], ...)

and here, for every model at once:
- batches: train.minibatches over train_idx[m], shuffled once an epoch with generators[m];
- dropout: nn.Dropout's masks, drawn from generators[m] with the call nn.Dropout makes on the CPU
  (bernoulli_(1 - p), then / (1 - p)) in the order of the forward's dropout calls, so model m's generator
  goes through exactly the draws the global RNG goes through one model at a time, and ends in the same state;
- loss: model m's mean cross-entropy over its batch; the models' losses are summed before backward, so each
  model's gradient is its own;
- optimizer: make_optimizer's Adam or SGD (EnsembleOptimizer), elementwise on the stacked tensors, with a
  step count per model, since models stop (early_stop) at different epochs;
- masks: masks[m] = {layer name: 0/1 tensor of that layer's weight}, as pruning.Pruner.masks holds them, are
  multiplied into the weights before every forward, as Pruner's forward pre-hook does: pruned weights are
  zero whenever a model runs and in every state returned, while the optimizer (and its Adam state) keeps
  updating them in between, never rewound;
- dev selection: accuracy and loss as train.evaluate after every epoch; a model's best state is taken when
  its dev accuracy strictly improves on its best so far (from start_acc), and the model stops after
  `early_stop` stalled epochs while the others go on (train.fit's rule, per model);
- precision: float32, with data.amp's bfloat16 autocast on CUDA as in train_pass.

The results equal the one-at-a-time loop's up to float rounding: the stacked matrix products add in another
order than one model's (about 1e-8 a step; tests/test_ensemble.py holds short runs to 1e-5). Over long runs
rounding can decide a ReLU whose input is within rounding of zero, and so that step's gradient; from there
that model's weights drift apart, as they would between two BLAS builds or thread counts (in
bench/bench_ensemble.py's 100-epoch pretraining of 32 digits models, one model ends 1.4e-2 apart, its chosen
epoch the same). On CUDA nn.Dropout draws its masks with a fused kernel of its own, so there model m's
dropout masks are another draw (equally random).
"""

import copy
import math
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, vmap

from common import DivergedError, UsageError
from datasets import TensorData
from train import EVAL_BATCH, OPTIMIZERS, autocast, full_precision, minibatches

# Random layers other than nn.Dropout: their draws are not reproduced, so the ensemble refuses them.
UNSUPPORTED_RANDOM = (nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout, nn.RReLU)


class _Noise:
    """What the DrawnDropout layers of one ensemble share: the masks of the running forward (queue, in call
    order) or, during the shape probe, the list the calls are recorded in (shapes)."""

    def __init__(self):
        self.queue = None
        self.shapes = None


class DrawnDropout(nn.Module):
    """nn.Dropout whose masks come from outside: under vmap one random call cannot draw from M generators, so
    the ensemble draws model m's masks from its generator before the forward and each call takes the next.
    Without masks (evaluation) it is the identity, as nn.Dropout in eval mode."""

    def __init__(self, p: float, noise: _Noise):
        super().__init__()
        self.p = p
        self.noise = noise

    def forward(self, x):
        if self.noise.shapes is not None:  # the probe: record the mask this call takes
            if 0 < self.p < 1:
                self.noise.shapes.append((tuple(x.shape), self.p))
            return x
        if self.noise.queue is None or self.p == 0:  # F.dropout with p = 0 draws nothing
            return x
        if self.p == 1:
            return x * torch.zeros_like(x)
        mask = self.noise.queue.pop(0)
        return x * (mask if mask.dtype == x.dtype else mask.to(x.dtype))


def _plain_copy(model: nn.Module) -> nn.Module:
    """A copy of model on the meta device (no memory) without hooks. The ensemble runs the model's own
    forward only: a hook of the caller's (e.g. a Pruner's mask hook) acts on its own model's tensors, and
    masks come in as tensors instead."""
    skeleton = copy.deepcopy(model).to("meta")
    for module in skeleton.modules():
        for attr in (
            "_forward_pre_hooks",
            "_forward_pre_hooks_with_kwargs",
            "_forward_hooks",
            "_forward_hooks_with_kwargs",
            "_forward_hooks_always_called",
            "_backward_hooks",
            "_backward_pre_hooks",
        ):
            getattr(module, attr, {}).clear()
    return skeleton


def _with_drawn_dropout(model: nn.Module, noise: _Noise) -> nn.Module:
    """model with every nn.Dropout replaced by a DrawnDropout (a layer used twice stays one layer)."""
    replaced = {}
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, UNSUPPORTED_RANDOM):
                raise ValueError(
                    f"the ensemble reproduces nn.Dropout's random draws only; layer {name} is {type(child).__name__}"
                )
            if type(child) is nn.Dropout:
                if id(child) not in replaced:
                    replaced[id(child)] = DrawnDropout(child.p, noise)
                setattr(parent, name, replaced[id(child)])
    return model


def _signature(model: nn.Module) -> list:
    return [(n, tuple(t.shape), t.dtype) for n, t in [*model.named_parameters(), *model.named_buffers()]]


class Ensemble:
    """M models of one architecture as stacked tensors: params[name] and buffers[name] are [M, ...], named as in
    the model's named_parameters() / named_buffers(); model m is index m."""

    def __init__(self, model: nn.Module, params: dict, buffers: dict):
        self.plain = _plain_copy(model)
        self.noise = _Noise()
        self.net = _with_drawn_dropout(copy.deepcopy(self.plain), self.noise)
        self.params, self.buffers = params, buffers
        self.state_keys = list(self.plain.state_dict().keys())
        self._dropout_calls = {}

    @classmethod
    def from_models(cls, models: list) -> "Ensemble":
        """Stacked copies of the models' parameters and buffers: torch.func.stack_module_state's stacking,
        without its demand that the models be in one train/eval mode (the ensemble sets the mode itself)."""
        models = list(models)
        if not models:
            raise ValueError("an ensemble needs at least one model")
        for i, model in enumerate(models[1:], 1):
            if type(model) is not type(models[0]) or _signature(model) != _signature(models[0]):
                raise ValueError(f"model {i} is not of model 0's architecture (parameters, buffers, dtypes)")
        if len(list(models[0].named_parameters(remove_duplicate=False))) != len(list(models[0].parameters())):
            raise ValueError("the ensemble does not take models with tied (shared) parameters")
        named = [dict([*model.named_parameters(), *model.named_buffers()]) for model in models]
        params = {
            name: torch.stack([tensors[name].detach() for tensors in named]).requires_grad_(p.requires_grad)
            for name, p in models[0].named_parameters()
        }
        buffers = {name: torch.stack([tensors[name] for tensors in named]) for name, _ in models[0].named_buffers()}
        return cls(models[0], params, buffers)

    def __len__(self) -> int:
        return len(next(iter(self.params.values())))

    @property
    def device(self) -> torch.device:
        return next(iter(self.params.values())).device

    def _tensors(self) -> dict:
        return {**self.params, **self.buffers}

    def to_models(self) -> list:
        """M new models (without hooks), model m holding exactly the ensemble's tensors of index m."""
        models = []
        for m in range(len(self)):
            model = copy.deepcopy(self.plain).to_empty(device=self.device)
            self._write(model, m, self._tensors())
            models.append(model)
        return models

    def write_into(self, models: list, states: list = None) -> None:
        """Copy model m's tensors into models[m] in place (its parameters stay the same objects). With states,
        a states[m] that is not None (stacked tensors named as the ensemble's, e.g. the best states) gives
        model m its index m instead."""
        for m, model in enumerate(models):
            self._write(model, m, self._tensors() if states is None or states[m] is None else states[m])

    @staticmethod
    @torch.no_grad()
    def _write(model: nn.Module, m: int, tensors: dict) -> None:
        for name, t in [*model.named_parameters(), *model.named_buffers()]:
            if name in tensors:
                t.copy_(tensors[name][m])

    def state_dict(self, m: int, tensors: dict = None) -> dict:
        """Model m's state_dict (copies), from the ensemble's tensors or from `tensors` (same names)."""
        tensors = self._tensors() if tensors is None else tensors
        return {k: tensors[k][m].detach().clone() for k in self.state_keys}

    def select(self, rows: list) -> "Ensemble":
        """An ensemble of the models `rows` (copies of their tensors, in that order) sharing this one's network."""
        part = copy.copy(self)
        index = torch.tensor(rows, device=self.device)
        part.params = {
            k: v.detach().index_select(0, index).requires_grad_(v.requires_grad) for k, v in self.params.items()
        }
        part.buffers = {k: v.index_select(0, index) for k, v in self.buffers.items()}
        return part

    @torch.no_grad()
    def put(self, rows: list, part: "Ensemble") -> None:
        """Copy the tensors of `part` (made by select(rows)) back into models `rows`."""
        if part is self:
            return
        index = torch.tensor(rows, device=self.device)
        for k, v in self._tensors().items():
            v.index_copy_(0, index, part._tensors()[k].detach())

    def _forward(self, xs: torch.Tensor, per_model: bool, noise: tuple = None) -> torch.Tensor:
        """[M, B, C] logits on xs ([B, ...] for every model, or [M, B, ...]): in training mode with the dropout
        masks `noise` (one [M, ...] tensor a dropout call), else in eval mode."""

        def one(params, buffers, x, masks):
            self.noise.queue = None if noise is None else list(masks)
            try:
                out = functional_call(self.net, (params, buffers), (x,))
                if self.noise.queue:
                    raise RuntimeError("the forward made fewer dropout calls than its probe recorded")
                return out
            finally:
                self.noise.queue = None

        self.net.train(noise is not None)
        return vmap(one, in_dims=(0, 0, 0 if per_model else None, 0))(self.params, self.buffers, xs, noise or ())

    @torch.inference_mode()
    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """[M, B, C]: every model's eval-mode logits on the same inputs x [B, ...] (as train.predict)."""
        return self._forward(x, per_model=False)

    @torch.inference_mode()
    def logits_per_model(self, xs: torch.Tensor) -> torch.Tensor:
        """[M, B, C]: model m's eval-mode logits on xs[m] (xs: [M, B, ...])."""
        return self._forward(xs, per_model=True)

    def train_logits(self, xs: torch.Tensor, generators: list) -> torch.Tensor:
        """[M, B, C]: model m's training-mode logits on xs[m], with gradients, its dropout masks drawn from
        generators[m]."""
        return self._forward(xs, True, self.draw_dropout(xs, generators))

    def draw_dropout(self, xs: torch.Tensor, generators: list) -> tuple:
        """One [M, ...] mask per dropout call of a training forward on xs [M, B, ...], model m's drawn from
        generators[m] as nn.Dropout draws it on the CPU. Call by call, model by model: each generator sees its
        own model's calls in the forward's order, the only order that matters (the generators are independent)."""
        calls = self._probe(tuple(xs.shape[1:]), xs.dtype)
        masks = tuple(torch.empty((len(xs), *shape), device=xs.device) for shape, _ in calls)
        for mask, (_, p) in zip(masks, calls):
            for i, generator in enumerate(generators):
                mask[i].bernoulli_(1 - p, generator=generator)
            mask.div_(1 - p)
        return masks

    def _probe(self, shape: tuple, dtype: torch.dtype) -> list:
        """(input shape, p) of each dropout call, in order, of one model's training forward on an input of
        `shape`: a forward on the meta device (no compute), done once per shape."""
        if shape not in self._dropout_calls:
            self.noise.shapes = []
            try:
                self.net.train()
                with torch.no_grad():
                    self.net(torch.empty(shape, dtype=dtype, device="meta"))
                self._dropout_calls[shape] = self.noise.shapes
            finally:
                self.noise.shapes = None
        return self._dropout_calls[shape]

    def stack_masks(self, masks: list) -> dict:
        """{'<layer>.weight': [M, ...] mask} from masks[m] = {layer: mask} (pruning.Pruner.masks' form)."""
        if masks is None:
            return {}
        if len(masks) != len(self):
            raise ValueError(f"{len(masks)} mask dicts for {len(self)} models")
        names = set(masks[0])
        stacked = {}
        for m, mask in enumerate(masks):
            if set(mask) != names:
                raise ValueError(f"masks[{m}] covers layers {sorted(mask)}, masks[0] {sorted(names)}")
        for name in sorted(names):
            key = f"{name}.weight"
            if key not in self.params:
                raise ValueError(f"masks name layer {name}, which has no weight in this model")
            weight = self.params[key]
            stacked[key] = torch.stack([mask[name] for mask in masks]).to(weight.device, weight.dtype)
            if stacked[key].shape != weight.shape:
                raise ValueError(
                    f"the masks of {name} are {tuple(stacked[key].shape[1:])}, its weight {tuple(weight.shape[1:])}"
                )
        return stacked

    @torch.no_grad()
    def apply_masks(self, stacked: dict) -> None:
        """Multiply the masks into the weights: what Pruner's forward pre-hook does before every forward."""
        for key, mask in stacked.items():
            self.params[key].mul_(mask)


class EnsembleOptimizer:
    """train.make_optimizer's optimizer for an ensemble: Adam (betas 0.9, 0.999; eps 1e-8) or SGD (momentum
    0.9), each with weight decay added to the gradient, on the [M, ...] stacked parameters. Both update
    elementwise, so model m's slice gets the arithmetic torch.optim gives one model (the same operations as
    torch.optim.adam._single_tensor_adam and torch.optim.sgd._single_tensor_sgd; equal bit for bit, tested).
    What torch keeps per parameter tensor, Adam's step count, is kept per model: a model that stopped
    (early_stop) takes no steps while the others go on, so its later bias correction is its own. Keep one
    across fit_ensemble calls where the one-model code keeps its optimizer (a Defense's, through every pruning
    iteration)."""

    BETAS, EPS, MOMENTUM = (0.9, 0.999), 1e-8, 0.9

    def __init__(self, name: str, lr: float, weight_decay: float):
        if name not in OPTIMIZERS:
            raise UsageError(f"unknown optimizer '{name}'; valid: {', '.join(OPTIMIZERS)}")
        self.name, self.lr, self.weight_decay = name, lr, weight_decay
        self.state = {}  # parameter name -> {state name: [M, ...] tensor}, zeros before a model's first step
        self.steps = None  # steps each model has taken

    def prepare(self, params: dict) -> None:
        """The state for these stacked parameters (zeros, no steps) unless it is there."""
        count = len(next(iter(params.values())))
        if self.steps is None:
            self.steps = [0] * count
        if len(self.steps) != count:
            raise ValueError(f"this optimizer serves {len(self.steps)} models, not {count}")
        names = ("exp_avg", "exp_avg_sq") if self.name == "adam" else ("momentum_buffer",)
        for name, param in params.items():
            if name not in self.state:
                self.state[name] = {k: torch.zeros_like(param, memory_format=torch.preserve_format) for k in names}

    def select(self, rows: list) -> "EnsembleOptimizer":
        """The state of the models `rows` (copies, in that order), for Ensemble.select(rows)."""
        part = EnsembleOptimizer(self.name, self.lr, self.weight_decay)
        part.steps = [self.steps[m] for m in rows]
        for name, state in self.state.items():
            index = torch.tensor(rows, device=next(iter(state.values())).device)
            part.state[name] = {k: v.index_select(0, index) for k, v in state.items()}
        return part

    def put(self, rows: list, part: "EnsembleOptimizer") -> None:
        """Copy the state of `part` (made by select(rows)) back into models `rows`."""
        if part is self:
            return
        for m, steps in zip(rows, part.steps):
            self.steps[m] = steps
        for name, state in self.state.items():
            index = torch.tensor(rows, device=next(iter(state.values())).device)
            for k, v in state.items():
                v.index_copy_(0, index, part.state[name][k])

    @torch.no_grad()
    def step(self, params: dict) -> None:
        """One step of every model with the gradients in params[name].grad."""
        self.prepare(params)
        self.steps = [s + 1 for s in self.steps]
        for name, param in params.items():
            if param.grad is None:
                continue
            grad, state = param.grad, self.state[name]
            if self.weight_decay != 0:
                grad = grad.add(param, alpha=self.weight_decay)
            if self.name == "sgd":
                # torch starts the buffer as a copy of the first gradient; 0 * momentum + grad is that, exactly
                state["momentum_buffer"].mul_(self.MOMENTUM).add_(grad, alpha=1)
                param.add_(state["momentum_buffer"], alpha=-self.lr)
                continue
            beta1, beta2 = self.BETAS
            exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
            exp_avg.lerp_(grad, 1 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            # torch's Python-float step size and bias correction, one a model, in the float32 its kernels use
            shape = (len(self.steps),) + (1,) * (param.dim() - 1)
            step_size = [-(self.lr / (1 - beta1 ** float(s))) for s in self.steps]
            bias_correction2_sqrt = [(1 - beta2 ** float(s)) ** 0.5 for s in self.steps]
            step_size = torch.tensor(step_size, dtype=param.dtype, device=param.device).view(shape)
            bias_correction2_sqrt = torch.tensor(bias_correction2_sqrt, dtype=param.dtype, device=param.device)
            denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt.view(shape)).add_(self.EPS)
            param.add_(step_size * exp_avg / denom)  # addcdiv_'s self + value * t1 / t2, in that order


def _stacked_rows(data: TensorData, idx: torch.Tensor) -> tuple:
    """(x [M, B, ...], y [M, B]) of data at the rows idx [M, B]."""
    x, y = data.batch(idx.flatten())
    return x.view(*idx.shape, *x.shape[1:]), y.view(idx.shape)


def ensemble_pass(
    ens: Ensemble,
    data: TensorData,
    train_idx: list,
    optimizer: EnsembleOptimizer,
    batch_size: int,
    generators: list,
    masks: dict = None,
) -> tuple:
    """train.train_pass for every model of ens: model m a shuffled pass over train_idx[m] (batches and dropout
    drawn from generators[m]), under its masks. Returns (losses, accs %), one a model."""
    orders = [minibatches(idx, batch_size, generator=g) for idx, g in zip(train_idx, generators)]
    total_loss = torch.zeros(len(ens), device=ens.device)
    correct = torch.zeros(len(ens), dtype=torch.long, device=ens.device)
    for step in range(len(orders[0])):
        batch = torch.stack([order[step] for order in orders])
        x, y = _stacked_rows(data, batch)
        ens.apply_masks(masks or {})
        with autocast(data):
            out = full_precision(ens.train_logits(x, generators))
            losses = F.cross_entropy(out.flatten(0, 1), y.flatten(), reduction="none").view(y.shape).mean(1)
        for param in ens.params.values():
            param.grad = None
        losses.sum().backward()
        optimizer.step(ens.params)
        total_loss += losses.detach() * batch.shape[1]
        correct += (out.detach().argmax(-1) == y).sum(1)
    n = max(len(train_idx[0]), 1)
    return [loss / n for loss in total_loss.tolist()], [100.0 * c / n for c in correct.tolist()]


@torch.inference_mode()
def ensemble_logits(ens: Ensemble, data: TensorData, idx: torch.Tensor, batch_size: int = EVAL_BATCH) -> torch.Tensor:
    """[M, N, C] eval-mode logits, as train.predict per model: idx [N] (the same rows for every model) or
    [M, N] (model m's rows idx[m])."""
    with autocast(data):
        if idx.dim() == 1:
            chunks = [ens.logits(data.batch(b)[0]) for b in idx.split(batch_size)]
        else:
            chunks = [ens.logits_per_model(_stacked_rows(data, b)[0]) for b in idx.split(batch_size, dim=1)]
        return torch.cat([full_precision(c) for c in chunks], dim=1)


@torch.inference_mode()
def ensemble_evaluate(ens: Ensemble, data: TensorData, idx: torch.Tensor) -> tuple:
    """train.evaluate per model: ([accuracy %], [mean cross-entropy]) on idx [N] or [M, N], one a model."""
    logits = ensemble_logits(ens, data, idx)
    y = data.y[idx].expand(logits.shape[:2])
    hits = (logits.argmax(-1) == y).float().mean(-1).tolist()  # train.evaluate's float32 mean, per model
    sums = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").view(y.shape).sum(1).tolist()
    return [100.0 * hit for hit in hits], [total / y.shape[1] for total in sums]


def predict_ensemble(models: list, data: TensorData, idx: torch.Tensor) -> torch.Tensor:
    """[M, len(idx), C]: model m's logits on data[idx] (eval mode, as train.predict), all models at once."""
    return ensemble_logits(Ensemble.from_models(models), data, idx)


class EnsembleFit(NamedTuple):
    """One model's result of fit_ensemble; the first two are (best dev acc, best epoch)."""

    best_acc: float  # best dev accuracy %; start_acc when no epoch beat it
    best_epoch: int  # -1 when no epoch beat start_acc
    best_loss: float  # dev loss of the best epoch (what save_checkpoint stores as "loss"); nan without one
    last_loss: float  # dev loss of the model's last epoch (train.fit's second return value)
    epochs: int  # epochs the model trained (fewer than asked once early_stop stopped it)
    best_state: dict  # the model's state_dict at its best epoch (masks applied); None without one


def _check_inputs(models, train_idx, dev_idx, generators, device):
    count = len(models)
    if not (len(train_idx) == len(generators) == count):
        raise ValueError(f"{count} models need as many train_idx and generators ({len(train_idx)}, {len(generators)})")
    sizes = {len(idx) for idx in train_idx}
    if len(sizes) != 1:
        raise ValueError(f"every model's train_idx must have the same size; got sizes {sorted(sizes)}")
    if isinstance(dev_idx, (list, tuple)):
        if len(dev_idx) != count or len({len(idx) for idx in dev_idx}) != 1:
            raise ValueError("dev_idx: one index tensor a model, all of the same size, or one tensor for all")
        dev_idx = torch.stack(list(dev_idx))
    for m, generator in enumerate(generators):
        if generator.device.type != device.type:
            raise ValueError(
                f"generators[{m}] is on {generator.device}, the data on {device}; make it with "
                f"torch.Generator(device={str(device)!r})"
            )
    return dev_idx.to(device)


def fit_ensemble(
    models: list,
    data: TensorData,
    train_idx: list,
    dev_idx,
    epochs: int,
    batch_size: int,
    lr: float,
    optimizer,
    weight_decay: float,
    generators: list,
    masks: list = None,
    early_stop: int = 0,
    start_acc: float = -1.0,
    restore_best: bool = True,
    on_epoch=None,
) -> list:
    """Train the M models together, model m as train.fit trains it one at a time (module docstring): on
    train_idx[m] (all of one size), shuffled and with dropout drawn from generators[m] (torch.Generators on
    the data's device), under masks[m] ({layer name: 0/1 weight mask}, pruning.Pruner.masks' form) if given,
    selected on dev_idx (one tensor for all, or one a model, of one size). `optimizer` is a name of
    train.OPTIMIZERS (a fresh one, as pretraining makes) or an EnsembleOptimizer kept across calls (as a
    Defense keeps its optimizer through the pruning iterations; its lr and weight decay must be these).

    The models are written back in place: with restore_best, each holds its best state (as pretraining
    reloads best.pth); without, its last one (as prune_modi.py goes on from the last epoch into the next
    iteration while best.pth holds the best). on_epoch(epoch, rows), if given, gets after every epoch one
    dict a model (train_loss, train_acc, dev_loss, dev_acc), None for a model that had stopped. Returns one
    EnsembleFit a model. Models that stop leave the stacked computation (the others go on without them)."""
    models = list(models)
    device = data.y.device
    dev_idx = _check_inputs(models, train_idx, dev_idx, generators, device)
    train_idx = [idx.to(device) for idx in train_idx]
    if isinstance(optimizer, EnsembleOptimizer):
        if (optimizer.lr, optimizer.weight_decay) != (lr, weight_decay):
            raise ValueError(
                f"the optimizer has lr {optimizer.lr}, weight decay {optimizer.weight_decay}; "
                f"asked for {lr}, {weight_decay}"
            )
    else:
        optimizer = EnsembleOptimizer(optimizer, lr, weight_decay)
    ens = Ensemble.from_models(models)
    optimizer.prepare(ens.params)
    all_masks = ens.stack_masks(masks)
    count = len(ens)
    best_acc, best_epoch = [start_acc] * count, [-1] * count
    best_loss, last_loss, stall, ran = [math.nan] * count, [math.nan] * count, [0] * count, [0] * count
    best = None  # stacked tensors of every model's best state so far
    rows = list(range(count))  # the models still training; `work` holds them, in this order
    work, work_optimizer, work_masks = ens, optimizer, all_masks
    for epoch in range(epochs):
        if not rows:
            break
        gens = [generators[m] for m in rows]
        train_loss, train_acc = ensemble_pass(
            work, data, [train_idx[m] for m in rows], work_optimizer, batch_size, gens, work_masks
        )
        for i, m in enumerate(rows):
            if math.isfinite(train_acc[i]) and not math.isfinite(train_loss[i]):
                raise DivergedError(
                    f"training diverged: model {m}'s loss of epoch {epoch} is {train_loss[i]} (nothing of "
                    f"this epoch is kept); lower the lr, or check the lr and weight decays"
                )
        work.apply_masks(work_masks)  # the evaluation's forward runs the masked weights
        dev_acc, dev_loss = ensemble_evaluate(work, data, dev_idx if dev_idx.dim() == 1 else dev_idx[rows])
        metrics, improved, going_on = [None] * count, [], []
        for i, m in enumerate(rows):
            metrics[m] = {"train_loss": train_loss[i], "train_acc": train_acc[i]}
            metrics[m].update(dev_loss=dev_loss[i], dev_acc=dev_acc[i])
            ran[m], last_loss[m] = epoch + 1, dev_loss[i]
            if dev_acc[i] > best_acc[m]:
                best_acc[m], best_epoch[m], best_loss[m], stall[m] = dev_acc[i], epoch, dev_loss[i], 0
                improved.append(i)
            else:
                stall[m] += 1
            if not (early_stop > 0 and stall[m] > early_stop):
                going_on.append(i)
        if improved:
            with torch.no_grad():
                if best is None:
                    best = {k: t.detach().clone() for k, t in ens._tensors().items()}
                source = torch.tensor(improved, device=ens.device)
                target = torch.tensor([rows[i] for i in improved], device=ens.device)
                for k, t in work._tensors().items():
                    best[k].index_copy_(0, target, t.detach().index_select(0, source))
        if on_epoch is not None:
            on_epoch(epoch, metrics)
        if len(going_on) < len(rows):  # the stopped models leave the stacked computation
            if work is not ens:
                ens.put(rows, work)
                optimizer.put(rows, work_optimizer)
            rows = [rows[i] for i in going_on]
            if rows:
                work, work_optimizer = ens.select(rows), optimizer.select(rows)
                work_masks = {k: v[rows] for k, v in all_masks.items()}
            else:
                work = ens
    if work is not ens:
        ens.put(rows, work)
        optimizer.put(rows, work_optimizer)
    restore = [best if restore_best and best_epoch[m] >= 0 else None for m in range(count)]
    ens.write_into(models, restore)
    return [
        EnsembleFit(
            best_acc[m],
            best_epoch[m],
            best_loss[m],
            last_loss[m],
            ran[m],
            None if best_epoch[m] < 0 else ens.state_dict(m, best),
        )
        for m in range(count)
    ]
