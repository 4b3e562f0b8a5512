"""Training-loop overhead: the project's one-epoch function (train.train_pass) vs a bare loop over
pre-made batches, and vs the release's style (a per-item DataLoader over a Subset with 4 workers,
re-created every epoch). Also one columnfc epoch at 1k/10k/100k rows.

python bench/bench_train.py [--tiny] [--device cpu|cuda:0] [--amp] [--only MODEL] [--rows N] [--repeat N]
(--only: columnfc or an image model, resnet18, vgg16bn or densenet121; --rows: the image model's rows)
"""

import argparse

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset, TensorDataset

from common_bench import best_of, table

from datasets import TensorData
from models import TARGET_MODELS, build_model
from train import make_optimizer, train_pass


def bare_epoch(model, batches, optimizer):
    model.train()
    for x, y in batches:
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


def release_style_epoch(model, dataset, indices, optimizer, device, batch_size=128):
    model.train()
    loader = DataLoader(
        Subset(dataset, indices), batch_size=batch_size, shuffle=True, num_workers=4, pin_memory=device.type == "cuda"
    )
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


def setup(kind, rows, device, amp=False):
    g = torch.Generator().manual_seed(0)
    if kind == "columnfc":
        x = (torch.rand(rows, 446, generator=g) > 0.5).float()
        y = torch.randint(0, 30, (rows,), generator=g)
        model = build_model("columnfc", 30, 446)
        data = TensorData(x, y)
    else:  # an image model on CIFAR-shaped data
        x = torch.randint(0, 256, (rows, 3, 32, 32), dtype=torch.uint8, generator=g)
        y = torch.randint(0, 10, (rows,), generator=g)
        model = build_model(kind, 10, 3)
        data = TensorData(x, y, mean=(0.4914, 0.4822, 0.4465), std=(0.2023, 0.1994, 0.2010))
    return model.to(device), data.to(device, amp=amp)


def compare(kind, rows, device, with_release, amp=False, repeat=3):
    model, data = setup(kind, rows, device, amp)
    optimizer = make_optimizer(model.parameters(), "adam", 1e-3, 5e-4)
    idx = torch.arange(rows, device=device)
    batches = [data.batch(b) for b in idx.split(128)]  # pre-made: the floor the loop can reach
    t_project = best_of(lambda: train_pass(model, data, idx, optimizer, 128), repeat)
    t_bare = best_of(lambda: bare_epoch(model, batches, optimizer), repeat)
    row = [kind, rows, f"{t_project:.3f}", f"{t_bare:.3f}", f"{t_project / t_bare:.2f}"]
    if with_release:
        xs = torch.stack([data.batch(torch.tensor([i]))[0][0] for i in range(rows)]).cpu()
        dataset = TensorDataset(xs, data.y.cpu())
        t_rel = best_of(lambda: release_style_epoch(model, dataset, list(range(rows)), optimizer, device), repeat=2)
        row += [f"{t_rel:.3f}", f"{t_rel / t_project:.1f}"]
    else:
        row += ["-", "-"]
    return row


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tiny", action="store_true", help="tiny sizes, to check the script runs")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--amp", action="store_true", help="the project's epoch under --amp (bfloat16 autocast, CUDA)")
    parser.add_argument("--only", choices=TARGET_MODELS, help="one model's rows only")
    parser.add_argument("--rows", type=int, help="rows of the image model's epoch (default 512; 64 with --tiny)")
    parser.add_argument("--repeat", type=int, default=3, help="timed epochs per number (the smallest is shown)")
    args = parser.parse_args()
    device = torch.device(args.device)
    fc_rows, window_rows, img_rows = (300, 60, 64) if args.tiny else (4008, 450, 512)
    img_rows = args.rows or img_rows
    # a window defense trains ~classes x width rows per epoch (Location: 30 x 15), and the release builds
    # a new DataLoader for each such epoch
    rows = []
    if args.only in (None, "columnfc"):
        rows += [
            compare("columnfc", fc_rows, device, True, args.amp, args.repeat),
            compare("columnfc", window_rows, device, True, args.amp, args.repeat),
        ]
    if args.only not in (None, "columnfc"):
        rows.append(compare(args.only, img_rows, device, False, args.amp, args.repeat))
    elif args.only is None:
        rows.append(compare("resnet18", img_rows, device, not args.tiny, args.amp, args.repeat))
    amp = ", --amp" if args.amp else ""
    table(
        f"one epoch, seconds ({device}{amp})",
        ["model", "rows", "project", "bare", "project/bare", "release-style", "release/project"],
        rows,
    )
    if device.type == "cuda":
        print(f"peak GPU memory allocated: {torch.cuda.max_memory_allocated(device) / 2**30:.3f} GiB")
    if args.only not in (None, "columnfc"):
        return
    sizes = (100, 1000) if args.tiny else (1000, 10000, 100000)
    scaling = []
    for n in sizes:
        model, data = setup("columnfc", n, device)
        optimizer = make_optimizer(model.parameters(), "adam", 1e-3, 5e-4)
        idx = torch.arange(n, device=device)
        t = best_of(lambda: train_pass(model, data, idx, optimizer, 128), repeat=2)  # noqa: B023 (called at once)
        scaling.append([n, f"{t:.3f}", f"{1e6 * t / n:.1f}"])
    table("columnfc epoch scaling", ["rows", "seconds", "us/row"], scaling)


if __name__ == "__main__":
    main()
