"""Live progress: tqdm bars on a terminal and TensorBoard scalars. Neither touches the torch RNG,
so a run logs the same numbers with them on or off.

A script makes one Progress from its --quiet / --no_tensorboard flags and passes it down to whatever
trains. Bars are off with --quiet or when stdout is not a terminal (a log file, a batch job). Scalars
go to log/<ds>_<model>/tb/<run>_<time>/; tensorboard is imported only when they are on.
"""

import os
import sys
import time
from contextlib import contextmanager

from tqdm import tqdm

from common import UsageError
from paths import tb_dir


class Progress:
    """Bars and scalars of one run. Progress() shows and records nothing (tests, library use)."""

    def __init__(self, quiet: bool = True, tb_folder: str = None):
        self.quiet = quiet
        self.writer = None
        if tb_folder is None:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise UsageError("tensorboard is not installed; pip install tensorboard, or pass --no_tensorboard")
        self.writer = SummaryWriter(tb_folder)

    @classmethod
    def from_args(cls, args, run: str) -> "Progress":
        """--quiet and --no_tensorboard of a script; scalars under log/<ds>_<model>/tb/<run>_<date-time>/."""
        folder = None if args.no_tensorboard else os.path.join(tb_dir(args), f"{run}_{time.strftime('%Y%m%d-%H%M%S')}")
        return cls(args.quiet, folder)

    def bar(self, iterable=None, **kwargs) -> tqdm:
        """A tqdm bar that disappears when done; a no-op when quiet or without a terminal."""
        disable = self.quiet or not sys.stdout.isatty()
        return tqdm(iterable, disable=disable, leave=False, dynamic_ncols=True, **kwargs)

    def add(self, tag: str, value: float, step: int) -> None:
        if self.writer is not None:
            self.writer.add_scalar(tag, value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()

    @contextmanager
    def epochs(self, model_tag: str, epochs: int, first_step: int = 0, desc: str = None):
        """Yields fit()'s on_epoch callback: one bar step and the six curves <model_tag>/<train|dev|test>_
        <acc|loss> at step first_step + epoch."""
        bar = self.bar(total=epochs, desc=desc or f"{model_tag} epochs")

        def on_epoch(epoch, metrics):
            for name, value in metrics.items():
                self.add(f"{model_tag}/{name}", value, first_step + epoch)
            bar.set_postfix(dev_acc=f"{metrics['dev_acc']:.2f}", refresh=False)
            bar.update()

        try:
            yield on_epoch
        finally:
            bar.close()
