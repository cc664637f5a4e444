"""The install: constraints.txt pins what `.[dev]` brings, and the environment the tests run in is the pinned one.

A fresh clone must pass its own tests whatever the registry serves that day, so `make install` and CI install at
the versions of constraints.txt, and `make lock` alone moves them (docs/index.md: Set up and run).
"""

import importlib.metadata
import re
from pathlib import Path

import pytest
from conftest import shared_folder
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent


def pins() -> dict[str, str]:
    """constraints.txt as {canonical name: version}; every line a comment or `name==version`, each name once."""
    found = {}
    for number, line in enumerate((ROOT / "constraints.txt").read_text().splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;#]+)", line)
        assert match, f"constraints.txt:{number}: {line!r} is no `name==version` pin"
        name = canonicalize_name(match[1])
        assert name not in found, f"constraints.txt:{number}: {match[1]} is pinned twice"
        found[name] = match[2]
    return found


def declared() -> list[Requirement]:
    """pyproject.toml's dependencies and every extra's (dev holds them all)."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        pytest.skip("Python 3.10 has no tomllib to read pyproject.toml")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    return [Requirement(r) for r in [*project["dependencies"], *(r for group in extras.values() for r in group)]]


def test_the_constraints_pin_every_declared_requirement_within_its_range():
    pinned = pins()
    assert "transfer" not in pinned  # the project itself is installed from the checkout
    assert len(pinned) > 100  # the whole closure, not the direct requirements alone
    for requirement in declared():
        name = canonicalize_name(requirement.name)
        assert name in pinned, f"{requirement} is in pyproject.toml but not pinned in constraints.txt (make lock)"
        assert requirement.specifier.contains(pinned[name], prereleases=True), (
            f"constraints.txt pins {name}=={pinned[name]}, outside pyproject.toml's {requirement}"
        )
        for extra in requirement.extras:  # pandas[output-formatting]: what the extra brings is pinned too
            for needed in importlib.metadata.requires(requirement.name) or []:
                needed = Requirement(needed)
                if needed.marker is not None and needed.marker.evaluate({"extra": extra}):
                    assert canonicalize_name(needed.name) in pinned, f"{needed.name} ({requirement}) is not pinned"


def test_the_installed_versions_are_the_pinned_ones():
    """A drifted environment (a package upgraded by hand, an install without the constraints) is noticed here,
    rather than as a test that fails for another reason."""
    drifted = []
    for name, version in pins().items():
        try:
            installed = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue  # another platform's package (the lock was made on Linux)
        # == as pip reads a constraint: torch==2.13.0 is met by the CPU build 2.13.0+cpu
        if not SpecifierSet(f"=={version}").contains(installed, prereleases=True):
            drifted.append(f"{name} {installed} (pinned {version})")
    assert not drifted, (
        f"installed other than constraints.txt pins: {', '.join(drifted)}; `make install` installs the pins, "
        "`make lock` moves them"
    )


def test_the_declared_torch_has_what_the_package_calls():
    # the loop clips with torch.nn.utils.get_total_norm and clip_grads_with_norm_, and generation uses
    # torch.compiler.set_stance: torch 2.6 and newer
    (torch,) = [r for r in declared() if r.name == "torch"]
    assert not torch.specifier.contains("2.5.1") and torch.specifier.contains(str(Version(pins()["torch"])))


def test_a_missing_shared_folder_skips_on_a_developers_machine_and_fails_under_ci(monkeypatch, tmp_path):
    monkeypatch.setenv("TRANSFER_SHARED", str(tmp_path / "nowhere"))
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="is not the shared/ folder"):
        shared_folder()
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="nowhere is not the shared/ folder .* a failure, not a skip"):
        shared_folder()
    monkeypatch.setenv("TRANSFER_SHARED", str(tmp_path))
    assert shared_folder() == tmp_path.resolve()
