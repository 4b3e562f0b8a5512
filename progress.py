"""Live progress: tqdm bars on a terminal and TensorBoard scalars. Neither touches the torch RNG,
so a run logs the same numbers with them on or off.

Bars are off with --quiet or when stdout is not a terminal (a log file, a batch job). Scalars go
to log/<ds>_<model>/tb/<run>_<time>/ unless --no_tensorboard; tensorboard is imported only then.
"""
import os
import sys
import time
from contextlib import contextmanager

from tqdm import tqdm

from common import UsageError
from paths import tb_dir

_quiet = False


def set_quiet(quiet):
    """--quiet for the whole run (the attack functions have no args to carry it)."""
    global _quiet
    _quiet = quiet


def progress_bar(iterable=None, **kwargs):
    """A tqdm bar that disappears when done; a no-op under --quiet or without a terminal."""
    disable = _quiet or not sys.stdout.isatty()
    return tqdm(iterable, disable=disable, leave=False, dynamic_ncols=True, **kwargs)


class Scalars:
    """TensorBoard scalars of one run, or nothing with --no_tensorboard."""

    def __init__(self, args=None, run=""):
        self.writer = None
        if args is None or args.no_tensorboard:  # Scalars() records nothing
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise UsageError("tensorboard is not installed; pip install tensorboard, or pass --no_tensorboard")
        self.writer = SummaryWriter(os.path.join(tb_dir(args), f"{run}_{time.strftime('%Y%m%d-%H%M%S')}"))

    def add(self, tag, value, step):
        if self.writer is not None:
            self.writer.add_scalar(tag, value, step)

    def close(self):
        if self.writer is not None:
            self.writer.close()


@contextmanager
def epoch_monitor(scalars, model_tag, epochs, first_step=0, desc=None):
    """Yields fit()'s on_epoch callback: one bar step and the six curves <model_tag>/<train|dev|test>_
    <acc|loss> at step first_step + epoch."""
    scalars = scalars or Scalars()
    bar = progress_bar(total=epochs, desc=desc or f"{model_tag} epochs")

    def on_epoch(epoch, metrics):
        for name, value in metrics.items():
            scalars.add(f"{model_tag}/{name}", value, first_step + epoch)
        bar.set_postfix(dev_acc=f"{metrics['dev_acc']:.2f}", refresh=False)
        bar.update()

    try:
        yield on_epoch
    finally:
        bar.close()
