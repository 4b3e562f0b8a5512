"""One audit.py step's settings, resolved once from its command line (audit.py builds them) and passed to the step:
the run and its folders, the plan, the pruned stage with its defense and defense settings, what a tuned setting
depends on, and the commands a message tells the reader to run. Steps read these instead of re-deriving them."""

import argparse
import dataclasses
import os
import shlex
from functools import cached_property

from auditing.plan import Plan
from common import UsageError
from defenses import DefenseSettings, get_defense
from paths import (
    audit_dir,
    audit_log_path,
    audit_memscore_path,
    audit_model_dir,
    audit_plan_path,
    audit_record_path,
    audit_scores_path,
    run_name,
    tagged,
)
from prune_modi import force_defense_flags
from train import file_sha256

SCHEDULE = ("pruner_name", "prune_sparsity", "prune_iter", "prune_epochs", "early_stop", "semantics")
# what a tuned setting depends on besides the plan (tune's chosen-setting file holds it, --tuned compares)
TUNED_FOR = (*SCHEDULE[:5], "semantics", "dp_microbatch", "epochs", "optimizer", "lr", "weight_decay", "batch_size")


@dataclasses.dataclass(frozen=True)
class AuditSettings:
    """flags: the command line as parsed, with the defense's flags resolved (--tuned, the defaults, the forced
    ones); the pipeline's own functions (prune_model, load_model) take it as prune_modi.py's namespace, and a step
    reads its plain flag values there. Everything derived from it is a field or a method here."""

    step: str
    flags: argparse.Namespace
    run: str  # <ds>_<model>[_seed<k>]
    folder: str  # result/<run>/audit[_tag-T]
    defense: type = None  # prune, attack (not --original), tune: the defense's class
    defense_settings: DefenseSettings = None  # prune and attack
    stage: str = None  # prune and attack: the pruned stage's name (prune_modi.py's prefix, --tag, _auto)
    tuned_for: dict = None  # the steps with pruning flags
    tuned_from: dict = None  # --tuned: the chosen setting's file and what it holds

    @classmethod
    def of(cls, step: str, flags: argparse.Namespace) -> "AuditSettings":
        """The settings every step has (no defense resolved: audit.py does that, with what it needs)."""
        tuned_for = {k: getattr(flags, k) for k in TUNED_FOR} if hasattr(flags, "prune_iter") else None
        return cls(step, flags, run_name(flags), audit_dir(flags), tuned_for=tuned_for)

    def for_seed(self, seed: int) -> "AuditSettings":
        """These settings for the audit of another --seed (compare)."""
        return AuditSettings.of(self.step, argparse.Namespace(**{**vars(self.flags), "seed": seed}))

    # ------------------------------------------------------------ the plan and the files

    @cached_property
    def plan(self) -> tuple:
        """(the audit plan, its SHA-256), read once."""
        return Plan.load(self.plan_path, self.command("prepare")), file_sha256(self.plan_path)

    @property
    def plan_path(self) -> str:
        return audit_plan_path(self.flags)

    @property
    def memscore_path(self) -> str:
        return audit_memscore_path(self.flags)

    def path(self, *parts) -> str:
        return os.path.join(self.folder, *parts)

    def model_dir(self, stage: str, model: int, tuning: bool = False) -> str:
        return audit_model_dir(self.flags, stage, model, tuning)

    def record_path(self, stage: str) -> str:
        return audit_record_path(self.flags, stage)

    def scores_path(self, stage: str) -> str:
        return audit_scores_path(self.flags, stage)

    def log_path(self, name: str) -> str:
        return audit_log_path(self.flags, name)

    @property
    def schedule(self) -> dict:
        """The pruning schedule's flags."""
        return {k: getattr(self.flags, k) for k in SCHEDULE}

    # ------------------------------------------------------------ what a message tells the reader to run

    def command(self, step: str, *flags, own_audit: bool = True) -> str:
        """'python audit.py <step> GPU-ID CONFIG [flags]', with this audit's --seed and --audit_tag unless
        own_audit is False (flags that already hold them: a step's command line as recorded)."""
        extra = []
        if own_audit and self.flags.seed != 7:
            extra += ["--seed", str(self.flags.seed)]
        if own_audit and self.flags.audit_tag:
            extra += ["--audit_tag", self.flags.audit_tag]
        gpu, config = str(self.flags.gpu_id), self.flags.config_path
        return shlex.join(["python", "audit.py", step, gpu, config, *flags, *extra])

    def again(self, step: str, *flags) -> str:
        """'run python audit.py <step> GPU-ID CONFIG [flags] first'."""
        return f"run {self.command(step, *flags)} first"

    def rebuild(self, step: str, *flags) -> str:
        """'rebuild it with: python audit.py <step> GPU-ID CONFIG [flags]'."""
        return f"rebuild it with: {self.command(step, *flags)}"


def with_defense(audit: AuditSettings) -> AuditSettings:
    """audit with its defense resolved (prune, attack but --original, tune): the class; for prune and attack its
    --defend_arg default, the flags the defense forces (prune_modi.py's), its settings checked, and the stage's
    name. Run after --tuned has set the chosen flags."""
    flags = audit.flags
    defense = get_defense(flags.defend)
    if audit.step == "tune" or getattr(flags, "original", False):
        return dataclasses.replace(audit, defense=defense)
    default_defend_arg(flags)
    settings = defense_settings(flags, defense)
    return dataclasses.replace(audit, defense=defense, defense_settings=settings, stage=stage_of(flags, defense))


def defense_settings(flags, defense) -> DefenseSettings:
    """The defense's settings from flags (an audited stage's, or a tuning trial's): the flags it forces set first
    (prune_modi.py's), then checked."""
    force_defense_flags(flags)
    settings = DefenseSettings.from_args(flags)
    defense.check_args(settings)
    return settings


def default_defend_arg(flags) -> None:
    """--defend_arg when none is given: dp's noise multiplier is a choice (--tuned: the one audit.py tune --defend dp
    chose), every other defense's defaults to prune_modi.py's 4."""
    if flags.defend_arg is not None:
        return
    if get_defense(flags.defend).name == "dp":
        raise UsageError(
            "--defend dp needs its noise multiplier: --defend_arg SIGMA, or --tuned for the one audit.py tune "
            "--defend dp chose"
        )
    flags.defend_arg = 4.0


def stage_of(flags, defense) -> str:
    """The pruned stage's name: prune_modi.py's result prefix (with --tag; _auto for a setting given as auto)."""
    auto = bool(defense.auto_flags(flags))
    stage = defense.prefix(flags.pruner_name, flags.prune_sparsity, flags.defend_arg, flags.semantics, auto)
    return tagged(stage, flags.tag)
