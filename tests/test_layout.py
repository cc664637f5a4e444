"""The house's rules, as docs/layout.md states them: the import layers (import-linter's contracts in
pyproject.toml, which `make lint` runs too), and the sizes that keep a module one job and a function one read."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "transfer"
# "about 400 lines a module, about 80 a function" (docs/layout.md); the margin is the "about"
MODULE_LINES, FUNCTION_LINES = 430, 90


def test_each_layer_imports_only_the_layers_below_it_without_cycles_and_config_without_torch():
    import logging

    from importlinter.cli import lint_imports

    # import-linter configures logging with dictConfig, which disables every logger that exists: in this worker, the
    # later tests reading the project's log lines would see none of them
    existing = [logger for logger in logging.root.manager.loggerDict.values() if isinstance(logger, logging.Logger)]
    disabled = {logger: logger.disabled for logger in existing}
    try:
        # 0: every contract kept; 1: one broken (its report, naming the import, is printed above the failure)
        assert lint_imports(config_filename=str(ROOT / "pyproject.toml"), no_cache=True, no_logo=True) == 0
    finally:
        for logger, was in disabled.items():
            logger.disabled = was


def test_the_layers_name_every_module_of_the_package():
    """A module no layer names is checked by no contract: each top-level module and subpackage is in one."""
    import tomllib

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    (layers,) = [c["layers"] for c in config if c["type"] == "layers"]
    named = {name.strip().removeprefix("transfer.") for layer in layers for name in layer.split("|")}
    present = {p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    present |= {p.parent.name for p in PACKAGE.glob("*/__init__.py")}
    assert present == named


def test_no_module_or_function_outgrows_one_job():
    too_long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        text = path.read_text()
        where = path.relative_to(ROOT)
        if len(text.splitlines()) > MODULE_LINES:
            too_long.append(f"{where}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = node.end_lineno - node.lineno + 1
                if length > FUNCTION_LINES:
                    too_long.append(f"{where}:{node.lineno} {node.name}: {length} lines")
    assert not too_long
