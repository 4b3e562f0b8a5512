"""auditing/ensemble.py: M models trained as one batched ensemble equal the same models trained one at a time by
train.py's own functions (make_optimizer, train_pass, fit; pruning.Pruner and defenses.Base for fine-tuning), with the
same initial weights and the same batches.

The one-at-a-time reference seeds the global RNG with model m's seed; the ensemble gets a torch.Generator with
that seed. Both then draw the same shuffles and dropout masks, so the generators must end exactly where the
global RNG ends (checked), and the accuracies, chosen epochs, stopping epochs and masks must be equal. The
weights may differ by float rounding only: the stacked matrix products add in another order. Measured: about
3e-8 after 8 epochs. The tolerance, ATOL = 1e-5, is far below what one different batch or dropout mask makes
(an Adam step moves a weight by about lr = 1e-3), which is what these tests are there to catch.
"""

import copy

import pytest
import torch
import torch.nn as nn

from auditing.ensemble import Ensemble, EnsembleOptimizer, fit_ensemble, predict_ensemble
from common import DivergedError
from datasets import TensorData
from defenses import Base, DefenseSettings
from models import ColumnFC, build_model
from pruning import Pruner
from splits import ModelSplit
from train import fit, make_optimizer, predict, train_pass

ATOL = 1e-5
M, D, C, BATCH = 3, 16, 4, 32
SEEDS = [11, 12, 13]


def problem(seed=0):
    """A 4-class problem a ColumnFC learns in a few epochs but not perfectly (label noise), so dev accuracy
    stalls and early stopping acts: (data, per-model train index sets of one size, dev rows 300..399)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(400, D, generator=g)
    y = (x @ torch.randn(D, C, generator=g) + 3 * torch.randn(400, C, generator=g)).argmax(1)
    train_idx = [torch.randperm(300, generator=g)[:150] for _ in range(M)]
    return TensorData(x, y), train_idx, torch.arange(300, 400)


def fresh_models(seed=1):
    torch.manual_seed(seed)
    return [build_model("columnfc", C, D) for _ in range(M)]


def generators():
    return [torch.Generator().manual_seed(s) for s in SEEDS]


def states_close(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=0, atol=ATOL) for k in a)


def state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def pretrain_one_at_a_time(models, data, train_idx, dev_idx, epochs, name, early_stop):
    """pretrain_modi.pretrain per model, checkpoints kept in memory: [(best acc, best epoch, last loss, epochs
    run, best state, global RNG state at the end)]; each model is left at its best state."""
    out = []
    for m, model in enumerate(models):
        torch.manual_seed(SEEDS[m])
        optimizer = make_optimizer(model.parameters(), name, 1e-3 if name == "adam" else 1e-2, 5e-4)
        best, ran = {}, []

        def train_epoch(epoch, model=model, optimizer=optimizer, m=m, ran=ran):
            ran.append(epoch)
            return train_pass(model, data, train_idx[m], optimizer, BATCH)

        def on_best(epoch, acc, loss, model=model, best=best):
            best.update(epoch=epoch, state=state(model))

        dev = dev_idx[m] if isinstance(dev_idx, list) else dev_idx
        best_acc, last_loss = fit(model, train_epoch, data, dev, dev, epochs, early_stop, on_best)
        out.append((best_acc, best["epoch"], last_loss, len(ran), best["state"], torch.get_rng_state()))
        model.load_state_dict(best["state"])
    return out


@pytest.mark.parametrize("name", ["adam", "sgd"])
def test_stacked_optimizer_is_make_optimizers_bit_for_bit(name):
    """EnsembleOptimizer on [M, ...] tensors == M torch optimizers from make_optimizer, bit for bit, also when
    models skip steps (stopped by early_stop: fit_ensemble then steps the others as select(rows), put back),
    so that their step counts differ."""
    g = torch.Generator().manual_seed(0)
    shapes = {"w": (256, 64), "b": (10,), "odd": (7, 3)}
    stacked = {k: torch.randn(4, *s, generator=g) for k, s in shapes.items()}
    singles = [{k: stacked[k][m].clone().requires_grad_() for k in shapes} for m in range(4)]
    torch_opts = [make_optimizer(list(p.values()), name, 1e-3, 5e-4) for p in singles]
    ours = EnsembleOptimizer(name, 1e-3, 5e-4)
    ours.prepare(stacked)
    for step in range(25):
        rows = [m for m, on in enumerate([True, step % 3 != 1, step < 8, step >= 5]) if on]
        grads = {k: torch.randn(4, *s, generator=g) for k, s in shapes.items()}
        part = {k: stacked[k][rows].clone().requires_grad_() for k in shapes}
        for k in shapes:
            part[k].grad = grads[k][rows]
        optimizer = ours if len(rows) == 4 else ours.select(rows)
        optimizer.step(part)
        ours.put(rows, optimizer)
        for k in shapes:
            stacked[k][rows] = part[k].detach()
        for m in rows:
            for k in shapes:
                singles[m][k].grad = grads[k][m].clone()
            torch_opts[m].step()
    assert ours.steps == [25, 17, 8, 20]
    for m in range(4):
        for k in shapes:
            assert torch.equal(stacked[k][m], singles[m][k]), (m, k)


def test_training_forward_draws_nn_dropouts_masks():
    """Model m's training-mode logits in the ensemble == the model's own forward (nn.Dropout drawing from the
    global RNG seeded like generators[m]), and each generator ends where the global RNG does."""
    models = fresh_models()
    xs = torch.randn(M, 8, D, generator=torch.Generator().manual_seed(3))
    ens = Ensemble.from_models(models)
    gens = generators()
    got = ens.train_logits(xs, gens)
    for m, model in enumerate(models):
        torch.manual_seed(SEEDS[m])
        model.train()
        assert torch.allclose(got[m], model(xs[m]), rtol=0, atol=1e-6)
        assert torch.equal(gens[m].get_state(), torch.get_rng_state())
    # models 2 and 0 alone (as fit_ensemble runs the models that have not stopped)
    gens = generators()
    got = ens.select([2, 0]).train_logits(xs[[2, 0]], [gens[2], gens[0]])
    for i, m in enumerate([2, 0]):
        torch.manual_seed(SEEDS[m])
        assert torch.allclose(got[i], models[m](xs[m]), rtol=0, atol=1e-6)


@pytest.mark.parametrize("name, per_model_dev", [("adam", False), ("sgd", True)])
def test_pretraining_equals_one_at_a_time(name, per_model_dev):
    data, train_idx, dev = problem()
    dev_idx = dev  # the same dev rows for every model, or each model's own (of one size)
    if per_model_dev:
        dev_idx = [dev[torch.randperm(100, generator=torch.Generator().manual_seed(m))[:60]] for m in range(M)]
    models = fresh_models()
    reference = [copy.deepcopy(model) for model in models]
    expected = pretrain_one_at_a_time(reference, data, train_idx, dev_idx, 12, name, early_stop=1)
    gens = generators()
    lr = 1e-3 if name == "adam" else 1e-2
    got = fit_ensemble(models, data, train_idx, dev_idx, 12, BATCH, lr, name, 5e-4, gens, early_stop=1)
    assert len({e[3] for e in expected}) > 1  # the models stopped at different epochs: per-model stopping ran
    for m in range(M):
        best_acc, best_epoch, last_loss, epochs, best_state, rng = expected[m]
        assert got[m][:2] == (best_acc, best_epoch)
        assert got[m].epochs == epochs
        assert got[m].last_loss == pytest.approx(last_loss, rel=1e-5)
        assert states_close(got[m].best_state, best_state)
        assert states_close(state(models[m]), state(reference[m]))  # left at its best state, as pretraining
        assert torch.equal(gens[m].get_state(), rng)  # the same shuffles and dropout draws, no more, no fewer


def test_masked_base_fine_tuning_equals_the_pruning_loop():
    """Iterative pruning with Base fine-tuning, as prune_modi.prune_one runs it (Pruner, one Base defense and its
    optimizer through all iterations, fit with early stopping from the release's start_acc 0, the model going on
    from its last epoch), against the ensemble with the Pruners' masks and one EnsembleOptimizer."""
    data, train_idx, dev = problem()
    pretrained = fresh_models()
    settings = DefenseSettings(optimizer="adam", lr=1e-3, weight_decay=5e-4, batch_size=BATCH)
    reference = [copy.deepcopy(model) for model in pretrained]
    expected = []  # per model: per iteration (best acc, best epoch, last loss, best state), then masks, RNG state
    for m, model in enumerate(reference):
        torch.manual_seed(SEEDS[m])
        pruner = Pruner(model, "iter_prunetxt", 0.6, 3)
        base = Base(model, data, ModelSplit(train_idx[m], dev, dev), settings)
        iterations = []
        for iteration in range(3):
            pruner.prune(iteration)
            best = {}

            def on_best(epoch, acc, loss, best=best, model=model):
                best.update(epoch=epoch, state=state(model))

            acc, loss = fit(model, base.train_epoch, data, dev, dev, 5, 1, on_best, start_acc=0.0)
            iterations.append((acc, best.get("epoch", -1), loss, best.get("state")))
        expected.append((iterations, dict(pruner.masks), torch.get_rng_state()))

    models = [copy.deepcopy(model) for model in pretrained]
    pruners = [Pruner(model, "iter_prunetxt", 0.6, 3) for model in models]  # masks only: the ensemble runs no hooks
    optimizer, gens = EnsembleOptimizer("adam", 1e-3, 5e-4), generators()
    got, masks_used = [], []
    for iteration in range(3):
        for pruner in pruners:
            pruner.prune(iteration)
        masks = [dict(pruner.masks) for pruner in pruners]
        masks_used.append(masks)
        got.append(
            fit_ensemble(models, data, train_idx, dev, 5, BATCH, 1e-3, optimizer, 5e-4, gens, masks, 1, 0.0, False)
        )
    assert len({result.epochs for results in got for result in results}) > 1  # models stopped apart: their
    # Adam step counts differ in the next iteration
    for m in range(M):
        iterations, masks, rng = expected[m]
        for iteration, (acc, epoch, loss, best_state) in enumerate(iterations):
            result = got[iteration][m]
            assert (result.best_acc, result.best_epoch) == (acc, epoch)
            assert result.last_loss == pytest.approx(loss, rel=1e-5)
            assert states_close(result.best_state, best_state)
            for name, mask in masks_used[iteration][m].items():  # pruned weights stay exactly zero
                assert not result.best_state[f"{name}.weight"][mask == 0].any()
        assert pruners[m].masks.keys() == masks.keys()
        assert all(torch.equal(pruners[m].masks[k], masks[k]) for k in masks)
        assert states_close(state(models[m]), state(reference[m]))  # the last epoch's state, masked
        for name, mask in masks.items():
            assert not state(models[m])[f"{name}.weight"][mask == 0].any()
        assert torch.equal(gens[m].get_state(), rng)
    sparsity = float((pruners[0].masks["fc1"] == 0).float().mean())
    assert sparsity == pytest.approx(0.6, abs=1e-3)


def test_to_models_round_trip_is_exact_and_logits_are_each_models():
    models = fresh_models()
    Pruner(models[0], "iter_prunetxt", 0.6, 3)  # a hook on the source model is not copied
    ens = Ensemble.from_models(models)
    back = ens.to_models()
    assert all(type(b) is ColumnFC and not b.fc1._forward_pre_hooks for b in back)
    for model, copy_back in zip(models, back):
        assert model.state_dict().keys() == copy_back.state_dict().keys()
        assert all(torch.equal(v, copy_back.state_dict()[k]) for k, v in model.state_dict().items())
    data, _, dev = problem()
    x = data.batch(dev)[0]
    logits = ens.logits(x)
    per_model = ens.logits_per_model(x.expand(M, *x.shape))
    predicted = predict_ensemble(models, data, dev)
    for m, model in enumerate(models):
        own = predict(model, data, dev)
        for batched in (logits[m], per_model[m], predicted[m]):
            assert torch.allclose(batched, own, rtol=0, atol=1e-6)


def test_refuses_what_it_cannot_reproduce():
    data, train_idx, dev = problem()
    models, gens = fresh_models(), generators()
    with pytest.raises(ValueError, match="same size"):
        fit_ensemble(
            models, data, [train_idx[0], train_idx[1][:100], train_idx[2]], dev, 1, BATCH, 1e-3, "adam", 0, gens
        )
    with pytest.raises(ValueError, match="architecture"):
        Ensemble.from_models([build_model("columnfc", C, D), build_model("columnfc", C + 1, D)])
    with pytest.raises(ValueError, match="Dropout2d"):
        Ensemble.from_models([nn.Sequential(nn.Linear(D, C), nn.Dropout2d(0.1))])
    with pytest.raises(ValueError, match="lr"):
        fit_ensemble(models, data, train_idx, dev, 1, BATCH, 1e-2, EnsembleOptimizer("adam", 1e-3, 0), 0, gens)


def test_training_diverged_names_the_model():
    data, train_idx, dev = problem()
    models = fresh_models()
    with torch.no_grad():
        models[1].fc3.bias.fill_(float("inf"))
    with pytest.raises(DivergedError, match="model 1's loss of epoch 0"):
        fit_ensemble(models, data, train_idx, dev, 2, BATCH, 1e-3, "adam", 5e-4, generators())
