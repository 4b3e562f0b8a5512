"""README.md and docs/*.md cannot drift from the repository: every relative link and #anchor resolves
(GitHub's anchor rules), and every `python <script>.py ...` command they show parses with the script's
own argparse parser."""
import argparse
import glob
import importlib.util
import os
import re
import shlex
import sys

import pytest

from conftest import REPO

PAGES = [os.path.join(REPO, "README.md")] + sorted(glob.glob(os.path.join(REPO, "docs", "*.md")))
FENCE = re.compile(r"^```.*?^```", re.S | re.M)
# the one synopsis line in the docs: its placeholders, as a user would fill them in
PLACEHOLDERS = {"GPU-ID": "-1", "CONFIG": "config/digits.json", "E": "5"}


def github_anchor(heading):
    """The id GitHub gives a heading: its text without markup, lowercased, punctuation dropped, spaces -> '-'."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "").replace("*", "")
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def anchors(path):
    """Every heading's anchor in a Markdown file; a repeated heading gets -1, -2, ... as on GitHub."""
    found, seen = set(), {}
    for heading in re.findall(r"^#{1,6} +(.+?) *$", FENCE.sub("", open(path).read()), re.M):
        anchor = github_anchor(heading)
        found.add(f"{anchor}-{seen[anchor]}" if anchor in seen else anchor)
        seen[anchor] = seen.get(anchor, 0) + 1
    return found


def links(path):
    """(target, fragment) of every relative link and image outside code blocks."""
    text = re.sub(r"`[^`]*`", "", FENCE.sub("", open(path).read()))
    for target in re.findall(r"!?\[[^\]]*\]\(([^)\s]+)\)", text):
        if not re.match(r"[a-z]+:", target):
            file, _, fragment = target.partition("#")
            yield os.path.normpath(os.path.join(os.path.dirname(path), file)) if file else path, fragment


def shown_commands(path):
    """The argument lists of every `python <script>.py ...` in a page: lines of code blocks (comments and
    redirections cut) and inline code spans, with the synopsis' placeholders filled in."""
    text = open(path).read()
    lines = [line for block in FENCE.findall(text) for line in block.splitlines()[1:-1]]
    lines += [" ".join(span.split()) for span in re.findall(r"`([^`]+)`", FENCE.sub("", text))]
    for line in lines:
        line = re.split(r" #|>", line.strip())[0]
        if re.match(r"python [\w/]+\.py", line):
            words = [PLACEHOLDERS.get(word, word) for word in shlex.split(line.replace("[", "").replace("]", ""))]
            yield words[1:]


class Parsed(BaseException):  # not an Exception: no handler in a script's main() can swallow it
    pass


def parse_as_the_script_does(monkeypatch, script, argv):
    """The script's own reading of this argv, run in the repository: its get_args(argv) (argparse and the
    script's checks of the flags, which raise UsageError), or for a script without one (bench/), its main()
    until its argparse parser returns. Nothing runs beyond that. A flag must be spelled in full: argparse
    would take an abbreviation, but a shown command should not rely on one."""
    monkeypatch.chdir(REPO)  # the shown configs and grids are relative to the repository
    monkeypatch.syspath_prepend(os.path.join(REPO, os.path.dirname(script)))
    spec = importlib.util.spec_from_file_location(f"shown_{os.path.basename(script)[:-3]}", os.path.join(REPO, script))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    real_parse_args, flags = argparse.ArgumentParser.parse_args, set()
    stop_after_parsing = not hasattr(module, "get_args")

    def parse(self, args=None, namespace=None):
        flags.update(self._option_string_actions)
        parsed = real_parse_args(self, args, namespace)
        if stop_after_parsing:
            raise Parsed(parsed)
        return parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse)
    monkeypatch.setattr(sys, "argv", [script] + argv)
    with pytest.raises((Parsed, SystemExit)) as stop:
        raise Parsed(module.main() if stop_after_parsing else module.get_args(argv))
    if stop.type is SystemExit:  # argparse's --help prints and exits 0; an error exits 2
        assert stop.value.code == 0 and "--help" in argv, f"python {script} {' '.join(argv)}: exit {stop.value.code}"
    unknown = [word for word in argv if word.startswith("--") and word.split("=")[0] not in flags]
    assert unknown == [], f"python {script} {' '.join(argv)}: not the full name of a flag"
    return stop.value.args[0] if stop.type is Parsed else None


def test_anchors_follow_githubs_rules():
    assert github_anchor("Running the paper's grid") == "running-the-papers-grid"
    assert github_anchor("The paper's defenses (WeMeM)") == "the-papers-defenses-wemem"
    assert github_anchor("What the DP number covers") == "what-the-dp-number-covers"
    assert github_anchor("`--semantics` and [seeds](x.md)") == "--semantics-and-seeds"


def test_every_relative_link_and_anchor_resolves():
    checked, broken = 0, []
    for page in PAGES:
        for file, fragment in links(page):
            checked += 1
            if not os.path.exists(file):
                broken.append(f"{os.path.relpath(page, REPO)}: {os.path.relpath(file, REPO)} does not exist")
            elif fragment and fragment not in anchors(file):
                broken.append(f"{os.path.relpath(page, REPO)}: no heading #{fragment} in {os.path.relpath(file, REPO)}")
    assert broken == []
    assert checked >= 40  # the README's contents list alone links every page


def test_a_broken_anchor_is_found(tmp_path):
    (tmp_path / "a.md").write_text("# Title\n\n## Some section\n\n[ok](#some-section) [bad](b.md#nope) [gone](c.md)\n")
    (tmp_path / "b.md").write_text("# B\n\n```\n# not a heading\n```\n")
    found = [(os.path.basename(file), fragment) for file, fragment in links(str(tmp_path / "a.md"))]
    assert found == [("a.md", "some-section"), ("b.md", "nope"), ("c.md", "")]
    assert anchors(str(tmp_path / "a.md")) == {"title", "some-section"}
    assert anchors(str(tmp_path / "b.md")) == {"b"}


def test_every_shown_command_parses(monkeypatch):
    commands = sorted({tuple(words) for page in PAGES for words in shown_commands(page)})
    scripts = {words[0] for words in commands}
    assert {"pretrain_modi.py", "prune_modi.py", "mia_modi.py", "grid.py", "summarize.py",
            "compute_memscore.py", "bench/bench_train.py"} <= scripts
    for script, *argv in commands:
        with monkeypatch.context() as patch:
            parse_as_the_script_does(patch, script, argv)


def test_a_wrong_flag_in_a_shown_command_is_caught(monkeypatch):
    args = parse_as_the_script_does(monkeypatch, "prune_modi.py", ["0", "config/digits.json", "--defend", "ml2"])
    assert (args.gpu_id, args.defend, args.mem_thre) == (0, "ml2", 0.6)
    with pytest.raises(Exception, match="unrecognized arguments: --no_such_flag"):
        parse_as_the_script_does(monkeypatch, "prune_modi.py", ["0", "config/digits.json", "--no_such_flag"])
    with pytest.raises(Exception, match="needs --stride and --width"):
        parse_as_the_script_does(monkeypatch, "prune_modi.py", ["0", "config/digits.json", "--defend", "slide_re"])
    with pytest.raises(AssertionError, match="not the full name of a flag"):
        parse_as_the_script_does(monkeypatch, "prune_modi.py", ["0", "config/digits.json", "--prune_spars", "0.6"])
    args = parse_as_the_script_does(monkeypatch, "bench/bench_train.py", ["--device", "cuda:0"])
    assert (args.device, args.tiny) == ("cuda:0", False)
    with pytest.raises(AssertionError, match="exit 2"):
        parse_as_the_script_does(monkeypatch, "bench/bench_train.py", ["--devices", "cpu"])
