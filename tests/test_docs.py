"""README.md and docs/*.md hold together: every relative link and #anchor resolves, README maps every
doc and stays one screen or two, and every command shown in a shell block names real subcommands
and options (fastvae's own parser, and the benchmarks' parsers for `python -m benchmarks.<module>`)."""
from __future__ import annotations

import argparse
import importlib
import re
import shlex
import sys
from pathlib import Path

import pytest

from fastvae.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
README_MAX_LINES = 120
SHELL = {"", "bash", "sh", "shell", "console"}
FENCE = re.compile(r"^```([\w-]*)\n(.*?)^```", re.S | re.M)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
OPTION = re.compile(r"^--?[A-Za-z][\w-]*$")


def _id(path: Path) -> str:
    return str(path.relative_to(ROOT))


def _prose(text: str) -> str:
    """The text without fenced blocks and inline code (links there are examples, not links)."""
    return re.sub(r"`[^`\n]*`", "", FENCE.sub("", text))


def anchors(text: str) -> set[str]:
    """GitHub's heading ids: lower case, punctuation dropped, spaces to hyphens, repeats numbered."""
    seen: dict[str, int] = {}
    out = set()
    for line in FENCE.sub("", text).splitlines():
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        slug = re.sub(r"[^\w\- ]", "", m.group(1).lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out | set(re.findall(r"<a\s+(?:id|name)=\"([^\"]+)\"", text))


@pytest.mark.parametrize("doc", DOCS, ids=_id)
def test_every_relative_link_and_anchor_resolves(doc):
    text = doc.read_text()
    broken = []
    for target in LINK.findall(_prose(text)):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = (doc.parent / path).resolve() if path else doc
        if not dest.exists():
            broken.append(f"{target}: {dest} does not exist")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest.read_text()):
            broken.append(f"{target}: no heading #{anchor} in {_id(dest)}")
    assert not broken, f"{_id(doc)}: " + "; ".join(broken)


def test_readme_is_the_front_door():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= README_MAX_LINES, "README.md is the front door: put the reference in docs/"
    linked = {(ROOT / t.partition("#")[0]).resolve() for t in LINK.findall(_prose(text))}
    missing = [_id(d) for d in DOCS[1:] if d.resolve() not in linked]
    assert not missing, f"README.md's map of the docs misses {missing}"


def test_every_doc_starts_with_a_title_and_what_it_is_for():
    for doc in DOCS[1:]:
        lines = doc.read_text().splitlines()
        assert lines[0].startswith("# ") and lines[1] == "" and lines[2] and not lines[2].startswith(("#", "```", "|")), (
            f"{_id(doc)} starts with its title, then a sentence of what a user finds there")


# -- commands in shell blocks -------------------------------------------------------------------------------------------

def _command_lines(block: str) -> list[str]:
    """A block's commands, one per line: backslash continuations and synopsis lines that go on
    indented with "[" joined to the line before."""
    block = block.replace("\\\n", " ")
    lines: list[str] = []
    for line in block.splitlines():
        if lines and re.match(r"^\s+\[", line):
            lines[-1] += " " + line.strip()
        elif line.strip():
            lines.append(line)
    return lines


def commands(text: str) -> list[tuple[str, list[str]]]:
    """(program, its arguments) for every `fastvae`, `python -m fastvae` and `python -m benchmarks.<module>`
    call in the shell blocks of a markdown text; the program is "fastvae" or "benchmarks.<module>"."""
    found = []
    for lang, block in FENCE.findall(text):
        if lang not in SHELL:
            continue
        for line in _command_lines(block):
            words = shlex.split(line, comments=True)
            start = 0
            for i, w in enumerate([*words, "&&"]):
                if w not in ("&&", "||", ";", "|"):
                    continue
                cmd, start = words[start:i], i + 1
                while cmd and re.match(r"^[A-Za-z_]\w*=", cmd[0]):  # VAR=value prefixes
                    cmd = cmd[1:]
                for j, word in enumerate(cmd):
                    by_name = word == "fastvae" and j == 0
                    by_module = j > 0 and cmd[j - 1] == "-m" and (word == "fastvae" or word.startswith("benchmarks."))
                    if by_name or by_module:
                        found.append((word, cmd[j + 1:]))
                        break
    return found


def _parser_of(module: str) -> argparse.ArgumentParser:
    """The ArgumentParser a benchmarks module's main() builds, caught as it parses."""

    class Caught(Exception):
        pass

    def catch(self, *args, **kwargs):
        raise Caught(self)

    mod = importlib.import_module(module)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(argparse.ArgumentParser, "parse_args", catch)
        mp.setattr(argparse.ArgumentParser, "parse_known_args", catch)
        mp.setattr(sys, "argv", [module])
        with pytest.raises(Caught) as caught:
            mod.main()
    return caught.value.args[0]


def _options(parser: argparse.ArgumentParser) -> set[str]:
    return {s for a in parser._actions for s in a.option_strings}


def _unknown_options(parser: argparse.ArgumentParser, args: list[str]) -> list[str]:
    """Options among args (synopsis notation allowed: [--a|--b]) that the parser does not define."""
    known = _options(parser)
    flags = [f.partition("=")[0] for w in args for f in w.strip("[]").split("|") if OPTION.match(f.partition("=")[0])]
    return [f for f in flags if f not in known]


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


def check_command(program: str, args: list[str]) -> list[str]:
    """What is wrong with one documented command: an unknown subcommand or option."""
    if program.startswith("benchmarks."):
        return _unknown_options(_parser_of(program), args)
    subcommands = _subparsers(build_parser())
    if not args or args[0] not in subcommands:
        return [f"no subcommand {args[:1]} (fastvae has {', '.join(subcommands)})"]
    if args[0] == "bench":  # every further argument belongs to benchmarks.run
        return _unknown_options(_parser_of("benchmarks.run"), args[1:])
    return _unknown_options(subcommands[args[0]], args[1:])


def test_commands_are_found_in_all_their_forms():
    text = ("```bash\nfastvae train --epochs 1 && python -m fastvae info  # a comment --nope\n"
            "torchrun --nproc_per_node=2 -m fastvae train \\\n  --seed 1\n"
            "FASTVAE_X=1 python3 -m benchmarks.gpu_check --dry-run\n```\n"
            "```python\nfastvae train --not-a-command\n```\n"
            "```\nfastvae sample RUN [-n 64]\n              [--out PNG] [--smoke|--quick]\n```\n")
    assert commands(text) == [("fastvae", ["train", "--epochs", "1"]), ("fastvae", ["info"]),
                              ("fastvae", ["train", "--seed", "1"]), ("benchmarks.gpu_check", ["--dry-run"]),
                              ("fastvae", ["sample", "RUN", "[-n", "64]", "[--out", "PNG]", "[--smoke|--quick]"])]
    assert check_command("fastvae", ["sample", "RUN", "[-n", "64]", "[--out", "PNG]", "[--smoke|--quick]"]) == ["--smoke", "--quick"]
    assert check_command("fastvae", ["trian"])[0].startswith("no subcommand ['trian']")
    assert check_command("fastvae", ["bench", "--smoke", "--parts=ops"]) == []
    assert check_command("benchmarks.report", ["--merge", "a", "b", "--out", "c", "--nope"]) == ["--nope"]


@pytest.mark.parametrize("doc", DOCS, ids=_id)
def test_documented_commands_name_real_subcommands_and_options(doc):
    problems = [f"`{' '.join([program, *args])}`: {p}" for program, args in commands(doc.read_text())
                for p in check_command(program, args)]
    assert not problems, f"{_id(doc)}: " + "; ".join(problems)
