"""The documentation as tests read it: README.md (the landing page) and the pages of docs/ (the site), so that a test
of a command finds it on the page where it lives, and follows it when the text moves."""

import re
import shlex
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def pages() -> dict[str, str]:
    """README.md and every page of docs/, by their paths from the repository's root."""
    paths = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    return {str(p.relative_to(ROOT)): p.read_text() for p in paths}


def section(page: str, heading: str) -> str:
    """The text of `page` under the heading that starts with `heading`, up to the next heading of its level or above."""
    lines = (ROOT / page).read_text().splitlines(keepends=True)
    fenced, headings = False, {}  # line number: level; a shell comment inside a code block is no heading
    for number, line in enumerate(lines):
        fenced ^= line.startswith("```")
        if not fenced and (match := re.match(r"(#+) ", line)):
            headings[number] = len(match[1])
    starts = [i for i in headings if lines[i].split(" ", 1)[1].startswith(heading)]
    assert len(starts) == 1, f"{page}: {len(starts)} headings start with {heading!r}"
    end = next((i for i in headings if i > starts[0] and headings[i] <= headings[starts[0]]), len(lines))
    return "".join(lines[starts[0] : end])


def shell_commands(text: str) -> list[list[str]]:
    """Each command of the text's ```bash blocks as its words: continuation lines joined, comments dropped, a block's
    `M="..."` variables put in where `$M` is used, leading `NAME=value` environment settings left out."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        variables = {}
        for line in block.replace("\\\n", " ").splitlines():
            if match := re.fullmatch(r'\s*([A-Z_]+)="([^"]*)"\s*', line):
                variables[match[1]] = match[2]
                continue
            for name, value in variables.items():
                line = line.replace(f"${name}", value)
            words = shlex.split(line, comments=True)
            while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):
                words.pop(0)
            if words:
                commands.append(words)
    return commands


def transfer_arguments(text: str) -> list[list[str]]:
    """The arguments of every `python -m transfer` command (the run itself, not transfer.export and the like)."""
    return [words[3:] for words in shell_commands(text) if words[:3] == ["python", "-m", "transfer"]]
