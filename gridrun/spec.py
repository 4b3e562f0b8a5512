"""The grid file: its keys and defaults, every check on it, and the settings each config runs (Grid)."""

import itertools
import json
import os
from types import SimpleNamespace

from auto_settings import AUTO
from common import UsageError, load_config
from gridrun.step import REPO, SCRIPTS
from paths import DEFAULT_SEED

GRID_KEYS = {
    "configs": list,
    "pruners": (str, dict),
    "sparsities": list,
    "defenses": list,
    "prune_iter": int,
    "seeds": list,
    "shadow_num": int,
    "attacks": str,
    "semantics": str,
    "original": bool,
    "control": bool,
    "adaptive": bool,
    "overrides": dict,
    "audit": dict,
}
DEFAULTS = {
    "prune_iter": 5,
    "seeds": [DEFAULT_SEED],
    "shadow_num": 5,
    "attacks": "threshold,samia",
    "semantics": "release",
    "original": False,
    "control": False,
    "adaptive": True,
    "overrides": {},
    "audit": {},
}
# An "audit" section makes the grid an audit grid (audit.py's steps, docs/audit.md): its keys, as audit.py's flags.
AUDIT_KEYS = {
    "models": int,
    "group_size": int,
    "canaries": int,
    "audit_top_memscore": int,
    "with_dp": bool,
    "bootstrap": int,
    "rmia_gamma": float,
    "prune_epochs": int,
    "early_stop": int,
    "early_stop_pretrain": int,
    "audit_tag": str,
    "control": bool,
    "tune": dict,
}
# audit.py tune's, for the defenses given as "tuned": true (and dp with with_dp); workers: steps per study
AUDIT_TUNE_KEYS = {"trials": int, "tuning_models": int, "workers": int, "target_acc": float, "tolerance": float}
SETTINGS = {"stride": int, "width": int, "mem_thre": float, "weight_decay_mem": float, "defend_arg": float}
EXAMPLES = {"stride": 1, "width": 15, "mem_thre": 0.6, "defend_arg": 4}
AUTO_WORD = f', "{AUTO}"'  # in the error line of a setting that can be derived
TAG_LETTERS = {"stride": "s", "width": "w", "mem_thre": "t", "weight_decay_mem": "wd"}
RESERVED = {
    "seed",
    "shadow_num",
    "quiet",
    "help",
    "pruner_name",
    "prune_sparsity",
    "prune_iter",
    "attacks",
    "defend",
    "adaptive",
    "original",
    "semantics",
    "tag",
    *SETTINGS,
}  # grid.py sets these itself


def is_a(value, want):
    """JSON types: a bool is not a number, an int is a float."""
    if want in (int, float):
        return isinstance(value, (int, float) if want is float else int) and not isinstance(value, bool)
    return isinstance(value, want)


def setting_keys(cls):
    """(required, optional) settings of a defense class."""
    from defenses import RiskMemory

    required = ({"stride", "width"} if cls.window else set()) | ({"defend_arg"} if cls.arg_in_name else set())
    return (required | {"mem_thre"}, {"weight_decay_mem"}) if issubclass(cls, RiskMemory) else (required, set())


def filled(cls, setting):
    """A setting with the scripts' defaults for its optional keys, as floats (to compare settings); auto stays."""
    from defenses import DefenseSettings

    defaults = {key: getattr(DefenseSettings(), key) for key in setting_keys(cls)[1]}
    return {key: value if value == AUTO else float(value) for key, value in {**defaults, **setting}.items()}


class Grid:
    """A validated grid file: its keys, defaults filled in, and settings[config] = [(entry, class, setting)]."""

    def __init__(self, path, shown):
        self.path = shown
        try:
            with open(path) as f:
                data = json.load(f)
        except IsADirectoryError:
            raise UsageError(f"grid file {shown} is a folder; pass a JSON grid file, e.g. grids/digits.json")
        except OSError as err:
            raise UsageError(
                f"grid file {shown} {'not found' if isinstance(err, FileNotFoundError) else 'unreadable'}"
                f" ({err.strerror}); pass a JSON grid such as grids/digits.json"
            )
        except (ValueError, UnicodeDecodeError) as err:
            raise UsageError(f"grid {shown} is not valid JSON ({err}); fix the file")
        self.check(isinstance(data, dict), "top level", "must be a JSON object (see grids/digits.json)")
        for key in data:
            self.check(key in GRID_KEYS, f"unknown key '{key}'", f"valid keys are {', '.join(GRID_KEYS)}")
        for key in ("configs", "pruners", "sparsities", "defenses"):
            self.check(key in data, f"key '{key}'", "missing (it has no default)")
        self.keys = {**DEFAULTS, **data}
        for key, want in GRID_KEYS.items():
            kind = "a non-empty list" if want is list else getattr(want, "__name__", "a string or an object")
            self.check(
                is_a(self.keys[key], want) and (self.keys[key] or want is not list),
                f"key '{key}'",
                f"must be {kind}, got {self.keys[key]!r}",
            )
        self.check_configs()
        self.check_values()
        self.check_audit("audit" in data)
        self.settings = {config: [] for config in self.configs}
        for i, entry in enumerate(self.keys["defenses"]):
            self.add_entry(i, entry)
        self.check(
            self.keys["adaptive"] or any(c.name == "base" for _, c, _ in self.settings[self.configs[0]]),
            "key 'adaptive'",
            'false attacks the defenses with Base-pruned shadows: add {"defend": "base"}',
        )

    def check(self, ok, where, what):
        if not ok:
            raise UsageError(f"grid {self.path}: {where}: {what}")

    def __getitem__(self, key):
        return self.keys[key]

    def check_configs(self):
        """Configs as one spelling each (config_name): one file written two ways is one config."""
        from pruning import PRUNERS

        self.configs, self.loaded, written = [], {}, {}
        for config in self.keys["configs"]:
            self.check(isinstance(config, str), "configs", f"{config!r} is not a path")
            name = config_name(config)
            if name in written:
                continue  # the same file again, e.g. ./config/digits.json after config/digits.json
            written[name] = config
            try:
                self.loaded[name] = load_config(name)
            except UsageError as err:
                self.check(False, "configs", f"{err} (paths are relative to the repo)")
            self.configs.append(name)
        pruners = self.keys["pruners"]
        if isinstance(pruners, dict):
            self.check(all(isinstance(v, str) for v in pruners.values()), "pruners", "each pruner must be a string")
            named = {}
            for config, pruner in pruners.items():
                name = config_name(config)
                self.check(
                    named.get(name, pruner) == pruner,
                    "pruners",
                    f"'{config}' and '{written.get(name, name)}' are one config with two pruners; keep one",
                )
                named[name] = pruner
            pruners = named
        self.pruners = dict.fromkeys(self.configs, pruners) if isinstance(pruners, str) else pruners
        for config in set(self.pruners) ^ set(self.configs):
            self.check(
                False,
                "pruners",
                f"'{config}' is {'not in configs' if config in self.pruners else 'missing'}"
                f"; give one pruner per config, or one string for all",
            )
        for config, pruner in self.pruners.items():
            self.check(
                pruner in PRUNERS, f"pruners ({config})", f"unknown pruner {pruner!r}; valid: {', '.join(PRUNERS)}"
            )

    def check_values(self):
        from attacks import parse_attacks
        from defenses import SEMANTICS
        from pruning import check_pruning_flags

        for sparsity in self.keys["sparsities"]:
            self.check(is_a(sparsity, float), "sparsities", f"{sparsity!r} is not a number")
            self.refused(lambda: check_pruning_flags(self.pruners[self.configs[0]], sparsity), "sparsities")  # noqa: B023
        self.sparsities = list(dict.fromkeys(float(s) for s in self.keys["sparsities"]))  # 0.6 twice is one run
        seeds = self.keys["seeds"]
        self.check(
            all(is_a(s, int) for s in seeds) and len(set(seeds)) == len(seeds),
            "seeds",
            f"must be distinct integers, got {seeds!r}",
        )
        self.refused(lambda: parse_attacks(self.keys["attacks"]), "attacks")
        self.check(self.keys["semantics"] in SEMANTICS, "semantics", f"must be one of {', '.join(SEMANTICS)}")
        for kind, flags in self.keys["overrides"].items():
            self.check(
                kind in SCRIPTS and isinstance(flags, dict),
                "overrides",
                f"'{kind}' must be one of {', '.join(SCRIPTS)}, each {{flag: value}}, e.g. "
                f'{{"pretrain": {{"epochs": 2}}}}',
            )
            for flag, value in flags.items():
                self.check(
                    flag not in RESERVED, f"overrides.{kind}", f"--{flag} is set by grid.py from the grid's own keys"
                )
                self.check(
                    isinstance(value, (str, int, float, bool)),
                    f"overrides.{kind}",
                    f"--{flag} must be a string, a number or true/false",
                )

    def check_audit(self, given):
        """The audit section: known keys of the right types, one sparsity (the audit's stage names hold no
        sparsity of their own), and overrides.audit flags that are not the section's own."""
        section = self.keys["audit"]
        self.audit = bool(section)
        if not given:
            return
        self.check(section, "key 'audit'", 'must name at least one setting, e.g. {"models": 32}')
        self.check(
            "dp" not in section,
            "audit.dp",
            "tune_dp's noise grid is retired: with_dp tunes dp as every defense, by the \"tune\" section's trials, "
            "tuning_models, target_acc and tolerance",
        )
        for key, value in section.items():
            self.check(key in AUDIT_KEYS, f"audit: unknown key '{key}'", f"valid keys are {', '.join(AUDIT_KEYS)}")
            want = AUDIT_KEYS[key]
            self.check(is_a(value, want), f"audit.{key}", f"must be {want.__name__}, got {value!r}")
        self.check(
            not ("canaries" in section and "audit_top_memscore" in section),
            "key 'audit'",
            "give canaries or audit_top_memscore, not both",
        )
        for key, value in section.get("tune", {}).items():
            self.check(
                key in AUDIT_TUNE_KEYS,
                f"audit.tune: unknown key '{key}'",
                f"valid keys are {', '.join(AUDIT_TUNE_KEYS)}",
            )
            want = AUDIT_TUNE_KEYS[key]
            self.check(
                is_a(value, want) and (want is float or value >= 1),
                f"audit.tune.{key}",
                f"must be an int >= 1, got {value!r}" if want is int else f"must be a number, got {value!r}",
            )
        self.check(
            len(self.sparsities) == 1,
            "sparsities",
            f"an audit grid takes one sparsity, got {self.sparsities}; one grid per sparsity, each its own audit_tag",
        )
        self.check(
            not (section.get("control") and self.sparsities[0] == 0),
            "audit.control",
            "adds Base at sparsity 0, which this grid's sparsity already is; drop it",
        )
        self.check(
            not self.keys["control"],
            "key 'control'",
            'an audit grid takes the control in its audit section: "audit": {"control": true}',
        )
        for flag in self.keys["overrides"].get("audit", {}):
            self.check(
                flag not in AUDIT_KEYS and flag not in AUDIT_TUNE_KEYS,
                "overrides.audit",
                f"--{flag} is a key of the audit section; set it there",
            )

    def refused(self, call, where):
        """call(); a UsageError it raises becomes one naming `where` in this grid."""
        try:
            call()
        except UsageError as err:
            self.check(False, where, str(err))

    def add_entry(self, i, entry):
        from defenses import DEFENSES, SEMANTICS, DefenseSettings

        self.check(
            isinstance(entry, dict) and isinstance(entry.get("defend"), str),
            f"defenses[{i}]",
            'must be an object with "defend": name, e.g. {"defend": "base"}',
        )
        cls = DEFENSES.get(entry["defend"])
        self.check(cls, f"defenses[{i}]", f"unknown defense {entry['defend']!r}; valid: {', '.join(DEFENSES)}")
        where, (required, optional) = f"defenses[{i}] ({cls.name})", setting_keys(cls)
        if "tuned" in entry:  # audit.py tune chooses the setting: nothing else to give but its semantics
            self.check(
                self.audit
                and entry["tuned"] is True
                and set(entry) <= {"defend", "tuned", "semantics"}
                and entry.get("semantics", "release") in SEMANTICS
                and cls.search_space,
                where,
                '"tuned": true stands alone (or with "semantics"), in an audit grid, for a defense with a search space',
            )
            setting = {"tuned": True, **({"semantics": entry["semantics"]} if "semantics" in entry else {})}
            for config in self.configs:
                if not any(c is cls and s == setting for _, c, s in self.settings[config]):  # twice: one run
                    self.settings[config].append((i, cls, setting))
            return
        allowed, per_config = required | optional, entry.get("per_config", {})
        for key in set(entry) - {"defend", "per_config"}:
            self.check(
                key in allowed,
                where,
                f"{cls.name} takes no '{key}'; it takes {', '.join(sorted(allowed)) or 'no setting'}",
            )
        self.check(
            isinstance(per_config, dict)
            and all(
                isinstance(c, str) and config_name(c) in self.configs and isinstance(v, dict) and set(v) <= allowed
                for c, v in per_config.items()
            ),
            where,
            f"per_config must map configs of the grid to {{setting: value}} with settings in "
            f"{', '.join(sorted(allowed)) or 'nothing'}",
        )
        per_config = {config_name(c): v for c, v in per_config.items()}
        for config in self.configs:
            values = {**{k: entry[k] for k in allowed if k in entry}, **per_config.get(config, {})}
            missing = required - set(values)
            example = ", ".join(f'"{key}": {EXAMPLES[key]}' for key in sorted(missing))
            self.check(
                not missing,
                where,
                f"needs {' and '.join(sorted(missing))}"
                + (f" for {config}" if per_config else "")
                + f"; add them, e.g. {example}",
            )
            choices = {k: v if isinstance(v, list) else [v] for k, v in values.items()}
            for key, options in choices.items():
                auto = key in cls.derivable  # "auto": derived from the data (auto_settings.py)
                self.check(
                    options and all(is_a(v, SETTINGS[key]) or (auto and v == AUTO) for v in options),
                    where,
                    f"{key} must be {SETTINGS[key].__name__}{AUTO_WORD if auto else ''} or a non-empty list of "
                    f"them, got {values[key]!r}",
                )
            for combo in itertools.product(*choices.values()):
                setting = dict(zip(choices, combo))
                settings = DefenseSettings(**setting, semantics=self.keys["semantics"])
                self.refused(lambda: cls.check_args(settings), where)  # e.g. stride 0, a negative ppb weight  # noqa: B023
                if not any(
                    other_cls is cls and filled(cls, other) == filled(cls, setting)
                    for _, other_cls, other in self.settings[config]
                ):  # a repeated setting is one run
                    self.settings[config].append((i, cls, setting))

    def tags(self, config):
        """The --tag of each setting of config: '' unless another setting shares its name (defense, whether a
        setting is auto and, for the baselines, defend_arg); then what varies within that group, e.g. s1w15 or
        s2w10-t0.3."""
        settings, tags, groups = self.settings[config], [""] * len(self.settings[config]), {}
        for n, (_, cls, setting) in enumerate(settings):
            auto = bool(cls.auto_flags(SimpleNamespace(**setting)))
            tuned = bool(setting.get("tuned"))  # its own stage (tag tuned), never one of a typed setting
            groups.setdefault((cls.name, setting.get("defend_arg"), auto, tuned), []).append(n)
        for members in (m for m in groups.values() if len(m) > 1):
            full = {n: filled(settings[n][1], settings[n][2]) for n in members}
            vary = [key for key in TAG_LETTERS if len({full[n].get(key) for n in members}) > 1]
            for n in members:
                value = {**full[n], **settings[n][2]}  # as the grid writes it: 15, not 15.0
                spell = lambda keys: "".join(f"{TAG_LETTERS[k]}{value[k]}" for k in keys if k in vary)  # noqa: B023
                tags[n] = "-".join(
                    p for p in (spell(("stride", "width")), spell(("mem_thre",)), spell(("weight_decay_mem",))) if p
                )
        return tags


def config_name(config):
    """A config path as one spelling: resolved (., .., links), relative to the repo when inside it."""
    path = os.path.realpath(os.path.join(REPO, config))
    inside = os.path.commonpath([path, os.path.realpath(REPO)]) == os.path.realpath(REPO)
    return os.path.relpath(path, os.path.realpath(REPO)) if inside else path
