"""The documentation says what works: README.md (the landing page) and the pages of docs/.

`make docs` builds the site in strict mode, which fails on a broken link or anchor between the pages of docs/; the
README is no page of the site, so its links are checked here, and so is what a newcomer runs first from it. Across
every page, a `python -m transfer.<module>` must name a module there is and a `make <target>` a target there is.
"""

import importlib.util
import re
from pathlib import Path

import pytest
from docs_pages import ROOT, pages, shell_commands, transfer_arguments

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def anchors(page: Path) -> set[str]:
    """The ids MkDocs gives the headings of a page (its `toc` extension's slugify), outside code blocks."""
    from markdown.extensions.toc import slugify

    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    return {slugify(re.sub(r"[`*]", "", m[1]), "-") for m in re.finditer(r"^#+ (.+)$", text, flags=re.M)}


def broken_links(root: Path) -> tuple[int, list[str]]:
    """How many links and images root/README.md holds, and each relative one that names no file or heading there."""
    links = [m[1] for m in LINK.finditer((root / "README.md").read_text())]
    broken = []
    for link in links:
        if re.match(r"[a-z]+://", link):
            continue
        path, _, anchor = link.partition("#")
        if not (root / path).is_file():
            broken.append(f"{link}: no file {path}")
        elif anchor and anchor not in anchors(root / path):
            broken.append(f"{link}: {path} has no heading #{anchor}")
    return len(links), broken


def test_every_link_of_the_readme_leads_to_a_file_and_heading_there_is():
    count, broken = broken_links(ROOT)
    assert count > 20 and broken == []


def test_every_module_and_make_target_the_docs_name_exists():
    targets = set(re.findall(r"^([a-z-]+):", (ROOT / "Makefile").read_text(), flags=re.M))
    missing = []
    for page, text in pages().items():
        for words in shell_commands(text):
            if words[:2] == ["python", "-m"] and importlib.util.find_spec(words[2]) is None:
                missing.append(f"{page}: python -m {words[2]}")
            if words[0] == "make" and len(words) > 1 and words[1] not in targets:
                missing.append(f"{page}: make {words[1]}")
    assert not missing


def test_the_readme_commands_are_accepted_as_written(monkeypatch):
    """What a newcomer runs first: each run and sweep of the landing page passes the start-up checks, unchanged."""
    from transfer.config.compose import check_command_line
    from transfer.errors import TransferError

    monkeypatch.chdir(ROOT)
    commands = transfer_arguments((ROOT / "README.md").read_text())
    assert len(commands) == 5
    for argv in commands:
        try:
            plan = check_command_line(argv)
        except TransferError as e:  # the real Qwen2 is built by `make qwen`, which CI does not run
            assert "+experiment=qwen_strategies" in argv and "build it with `make qwen`" in str(e), (argv, e)
            continue
        assert plan is not None and plan.multirun == ("-m" in argv), argv


@pytest.mark.parametrize(
    "link, why",
    [
        ("docs/no_such_page.md", "no file docs/no_such_page.md"),
        ("docs/scaling.md#no-such", "docs/scaling.md has no heading #no-such"),
    ],
)
def test_a_broken_readme_link_is_found(tmp_path, link, why):
    """The check can fail: a page that is not there, a heading that is not on the page; a heading that is, passes."""
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "scaling.md").write_text((ROOT / "docs" / "scaling.md").read_text())
    (tmp_path / "README.md").write_text(f"[ok](docs/scaling.md#hyper-parameter-search-optuna) and [broken]({link})\n")
    assert broken_links(tmp_path) == (2, [f"{link}: {why}"])
