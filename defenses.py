"""Defenses: each is one fine-tuning epoch under a rule, registered by name.

A defense is built once per model being pruned (victim or shadow) and lives through every pruning
iteration, so its optimizers keep their state. To add one, subclass Defense, set `name`, implement
`train_epoch(epoch)` and decorate with @register. `epoch` restarts at 0 every pruning iteration.
"""
from train import make_optimizer, train_pass
from common import UsageError

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
