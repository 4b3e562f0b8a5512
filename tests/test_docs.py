"""The docs cannot drift from the repo: in README.md and docs/*.md every relative link and #anchor resolves,
and every `python <script>.py ...` command they show parses with that script's own argparse.

Links: [text](target), ![alt](target), reference definitions `[name]: target` and HTML href/src outside
code; a target with a scheme (https:, mailto:) is not checked. The path is relative to the page and must
exist in the repo; an anchor must be a heading of the target page (or of the page itself for `#anchor`),
slugged as GitHub does: markup dropped, lower case, characters other than letters, digits, '_', '-' and
' ' removed, spaces to '-', a repeated slug gets -1, -2, ...

Commands: lines of fenced code blocks and inline code spans, split at `&&`, `||`, `;` and `|` (with
spaces around), backslash continuations joined, `# comments` and redirections (`> file`, `2>&1`) dropped;
a command is a line or span that starts with `python <script>.py` (after any VAR=value, nice or time
prefix; a quoted error message that mentions a command is not one). Placeholders take a real value:
GPU-ID -> -1 (the CPU), CONFIG -> config/digits.json, GRID.json -> grids/digits.json. A synopsis (a
command with `[optional]` parts, `...`, a `<placeholder>` or a `$VARIABLE`) is not run: each --flag it
names must be one of the script's options.
A command is parsed by the script's get_args(argv) when it has one (the config is loaded and the
scripts' own cross-flag checks run), else by running the script with --help appended (argparse checks
the shown values before it prints the help). Either way each --flag must be spelled out in full (argparse
would accept an abbreviation that a new flag can make ambiguous).
"""

import contextlib
import importlib
import io
import os
import re
import runpy
import shlex
import sys
import urllib.parse

import pytest

from common import UsageError
from conftest import REPO

PLACEHOLDERS = {"GPU-ID": "-1", "CONFIG": "config/digits.json", "GRID.json": "grids/digits.json"}
SEPARATORS = re.compile(r"\s(?:&&|\|\||;|\|)\s")
REDIRECT = re.compile(r"^(?:\d?>>?|<(?![^>]*>$)|\d?>&\d|&$)")  # > f, 2>&1, < f, &; not a <placeholder>
FLAG = re.compile(r"--[A-Za-z][\w-]*")
# a command line or span starts with python x.py, perhaps after VAR=1, nice -n 10, time or env
COMMAND = re.compile(r"^(?:(?:\w+=\S*|nice|-n|\d+|time|env)\s+)*python3? [\w./-]+\.py\b")
SYNOPSIS = re.compile(r"^\[|\]$|^\.\.\.$|<[^>]*>|^\$")  # [--optional], ..., <placeholder>, $VARIABLE


def doc_pages():
    docs = os.path.join(REPO, "docs")
    pages = sorted(f"docs/{name}" for name in os.listdir(docs) if name.endswith(".md")) if os.path.isdir(docs) else []
    return ["README.md", *pages]


def split_page(text):
    """(prose lines, code lines), each as (line number, text); fenced blocks are code."""
    prose, code, fence = [], [], None
    for number, line in enumerate(text.splitlines(), 1):
        opener = re.match(r"^\s*(`{3,}|~{3,})", line)
        if fence is None and opener:
            fence = opener.group(1)
        elif fence is not None and line.strip().startswith(fence[0] * len(fence)) and not line.strip().strip(fence[0]):
            fence = None
        elif fence is not None:
            code.append((number, line))
        else:
            prose.append((number, line))
    return prose, code


def without_code_spans(line):
    return re.sub(r"(`+)(.+?)\1", "", line)


def slug(heading):
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading: its text
    text = re.sub(r"<[^>]+>", "", text).replace("`", "").replace("*", "")
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


@pytest.fixture(scope="module")
def pages():
    found = {}
    for page in doc_pages():
        with open(os.path.join(REPO, page), encoding="utf-8") as f:
            found[page] = split_page(f.read())
    return found


def anchors(prose):
    seen, result = {}, set()
    for _, line in prose:
        heading = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if heading:
            base = slug(heading.group(1))
            result.add(base if base not in seen else f"{base}-{seen[base]}")
            seen[base] = seen.get(base, 0) + 1
        result.update(re.findall(r"<a\s+(?:name|id)=\"([^\"]+)\"", line))
    return result


def links(prose):
    for number, line in prose:
        bare = without_code_spans(line)
        targets = re.findall(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)", bare)
        targets += re.findall(r"^\s*\[[^\]]+\]:\s*(\S+)", bare)
        targets += re.findall(r"(?:href|src)=\"([^\"]+)\"", bare)
        for target in targets:
            if not re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:|^//", target):
                yield number, target


def test_links_and_anchors_resolve(pages):
    assert "README.md" in pages
    targets = {page: anchors(prose) for page, (prose, _) in pages.items()}
    broken, checked = [], 0
    for page, (prose, _) in pages.items():
        for number, target in links(prose):
            checked += 1
            path, _, anchor = target.partition("#")
            path = urllib.parse.unquote(path)
            resolved = os.path.normpath(os.path.join(os.path.dirname(page), path)) if path else page
            if resolved.startswith("..") or not os.path.exists(os.path.join(REPO, resolved)):
                broken.append(f"{page}:{number}: {target}: {resolved} does not exist")
            elif anchor and resolved.endswith(".md"):
                if resolved not in targets:
                    with open(os.path.join(REPO, resolved), encoding="utf-8") as f:
                        targets[resolved] = anchors(split_page(f.read())[0])
                if urllib.parse.unquote(anchor) not in targets[resolved]:
                    broken.append(f"{page}:{number}: {target}: no heading of {resolved} has the anchor #{anchor}")
    assert not broken, "broken links:\n" + "\n".join(broken)
    assert checked > 0 or len(pages) == 1  # the split docs link to each other


def test_anchor_slugs_follow_github():
    assert slug("Reading the results") == "reading-the-results"
    assert slug("`grid.py --jobs_per_gpu`: packed GPUs") == "gridpy---jobs_per_gpu-packed-gpus"
    assert slug("Differences from the paper's release") == "differences-from-the-papers-release"
    prose, _ = split_page('# A\n```\n# not a heading\n```\n## A\n## B <a name="x"></a>\n')
    assert anchors(prose) == {"a", "a-1", "b", "x"}


def shown_commands(pages):
    """(page, line number, text of the command) for every python <script>.py command shown."""
    for page, (prose, code) in pages.items():
        pieces, joined = [], ""
        for number, line in code:
            joined += line.rstrip()
            if joined.endswith("\\"):
                joined = joined[:-1] + " "
                continue
            pieces.append((number, joined))
            joined = ""
        for number, line in prose:
            pieces += [(number, span) for _, span in re.findall(r"(`+)(.+?)\1", line)]
        for number, text in pieces:
            for part in SEPARATORS.split(re.sub(r"^\s*\$\s+", "", text)):
                if COMMAND.match(part.strip()):  # not a quoted message that mentions a command
                    yield page, number, part.strip()


def command_argv(text):
    """(script, argv, synopsis) of a shown command: placeholders filled, redirections dropped."""
    tokens = shlex.split(text, comments=True)
    start = next(i for i, token in enumerate(tokens) if re.fullmatch(r"python3?", token))
    script, argv = tokens[start + 1], []
    for token in tokens[start + 2 :]:
        if REDIRECT.match(token):
            break
        argv.append(token)
    synopsis = any(SYNOPSIS.search(token) for token in argv)
    return os.path.normpath(script), [PLACEHOLDERS.get(token, token) for token in argv], synopsis


def parse_with_script(script, argv):
    """(the script's option strings, its usage error or None) for `python script argv`."""
    out = io.StringIO()
    name = script[:-3]
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        if os.path.dirname(script) == "" and hasattr(importlib.import_module(name), "get_args"):
            get_args = importlib.import_module(name).get_args
            with contextlib.suppress(SystemExit):
                get_args(["-h"])
            usage = out.getvalue()
            try:
                get_args(argv)
                error = None
            except UsageError as err:
                error = str(err)
            except SystemExit as err:  # --help shown in the docs
                error = None if err.code in (0, None) else f"exit {err.code}"
        else:
            old_argv, old_path = sys.argv, list(sys.path)
            sys.argv, sys.path[:0] = [script, *argv, "--help"], [os.path.join(REPO, os.path.dirname(script))]
            try:
                runpy.run_path(os.path.join(REPO, script), run_name="__main__")
                error = "ran past --help"
            except SystemExit as err:
                error = None if err.code in (0, None) else f"exit {err.code}: {out.getvalue().strip()[-300:]}"
            finally:
                sys.argv, sys.path[:] = old_argv, old_path
            usage = out.getvalue()
    usage = usage.split("\n\n", 1)[0]  # argparse's usage paragraph lists every option
    return set(FLAG.findall(usage)), error


def test_shown_commands_parse(pages, monkeypatch):
    monkeypatch.chdir(REPO)  # configs and grids are named relative to the repo
    commands = sorted(set(shown_commands(pages)))
    assert any("pretrain_modi.py" in text for _, _, text in commands), "found none of the pipeline's commands"
    refused, options_of = [], {}
    for page, number, text in commands:
        script, argv, synopsis = command_argv(text)
        where = f"{page}:{number}: {text}"
        if not os.path.isfile(os.path.join(REPO, script)):
            refused.append(f"{where}: no script {script}")
            continue
        if synopsis:
            argv = ["--help"]
        options, error = parse_with_script(script, argv)
        options_of.setdefault(script, options)
        unknown = sorted(
            {
                flag
                for flag in FLAG.findall(" ".join(argv if not synopsis else [text]))
                if flag not in options_of[script] and flag != "--help"
            }
        )
        if error:
            refused.append(f"{where}: {error}")
        elif unknown:
            refused.append(f"{where}: {', '.join(unknown)} not an option of {script} (spelled out in full)")
    assert not refused, "commands in the docs that their script refuses:\n" + "\n".join(refused)


def test_a_wrong_command_is_caught(monkeypatch):
    """The checks above can fail: a misspelt flag, a bad value and an abbreviation are each refused."""
    monkeypatch.chdir(REPO)
    assert parse_with_script("prune_modi.py", ["-1", "config/digits.json", "--prune_sparsty", "0.6"])[1]
    assert "invalid choice" in parse_with_script("grid.py", ["grids/digits.json", "--backend", "sge"])[1]
    options, error = parse_with_script("summarize.py", ["--mark"])
    assert error is None and "--markdown" in options and "--mark" not in options
    assert parse_with_script("bench/bench_train.py", ["--only", "vgg"])[1].startswith("exit 2")
    assert command_argv("OMP_NUM_THREADS=1 python grid.py GRID.json --jobs 2 > out.txt 2>&1  # note") == (
        "grid.py",
        ["grids/digits.json", "--jobs", "2"],
        False,
    )
    assert command_argv("python compute_memscore.py GPU-ID CONFIG [--num_models 100] [--force]")[2]
    assert command_argv("python prune_modi.py 0 CONFIG --prune_sparsity <s>")[2]
    pages = {
        "p.md": (
            [(1, "run `python grid.py GRID.json --jobs 2`; the error reads `error: ... python x.py`")],
            [
                (3, "error: see python grid.py --help"),
                (4, "cd x && nice -n 10 python mia_modi.py 0 CONFIG"),
                (5, "python <script>.py --help"),
            ],
        )
    }
    assert [text for _, _, text in shown_commands(pages)] == [
        "nice -n 10 python mia_modi.py 0 CONFIG",
        "python grid.py GRID.json --jobs 2",
    ]
