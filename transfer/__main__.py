"""`python -m transfer`: one run or a sweep (transfer/cli.py).

`--help` is answered here, from the conf folders, before Hydra, the config schema or torch is imported: Hydra's own
help composes the whole config first (seconds) and lists its internal schema/ groups beside the project's.
"""

import re
import sys
from pathlib import Path

CONF = Path(__file__).resolve().parent / "conf"
# the groups whose use differs from GROUP=OPTION, and how
USE = {
    "eval/probes": "a list, [] for none: 'eval/probes=[python_docs,wikitext]'",
    "experiment": "a preset, added: +experiment=smoke",
    "hparams_search": "an Optuna search space, with -m: -m hparams_search=lora_lr_rank",
}
NOT_OVERRIDES = ("defaults", "hydra", "search")  # config.yaml's sections that a user does not set by hand
MORE = """\
more:
  python -m transfer --cfg job [OVERRIDES]               the composed config: every key and its value
  python -m transfer --config-dir DIR +experiment=NAME   presets of your own (docs/own-configs.md)
  python -m transfer resume=true hydra.run.dir=FOLDER    continue an interrupted run (a sweep: hydra.sweep.dir)
  python -m transfer.aggregate [SWEEP]                   a sweep's tables and plots
  python -m transfer --hydra-help                        Hydra's own flags
  README.md, docs/                                       the manual"""


def groups() -> dict[str, list[str]]:
    """Each config group (a folder of conf/ holding options), with its options: the folder's .yaml files."""
    found = {}
    for folder in sorted(p for p in CONF.rglob("*") if p.is_dir()):
        options = sorted(p.stem for p in folder.glob("*.yaml"))
        if options:
            found[folder.relative_to(CONF).as_posix()] = options
    return found


def defaults(config: str) -> dict[str, str]:
    """config.yaml's defaults list: group -> its default option ('[python_docs]' for a list, 'null' for none)."""
    listed = re.search(r"^defaults:\n((?:  - .*\n)+)", config, re.M)
    choices = re.findall(r"^  - ([\w/]+): ([^#\n]*?)\s*(?:#.*)?$", listed.group(1) if listed else "", re.M)
    return dict(choices)


def overrides(config: str) -> list[tuple[str, str, str]]:
    """config.yaml's settings as (key, default, its comment): the top level's and each section's first level."""
    found, section = [], None
    for line in config.splitlines():
        setting = re.match(r"^( {2})?(\w+):\s*([^#]*?)\s*(?:#\s*(.*))?$", line)
        if setting is None or line.startswith(" ") and not setting.group(1):
            continue  # a list item, a deeper level, a comment
        nested, key, value, comment = setting.groups()
        if not nested:
            section = None if value else key  # a key without a value opens a section
        name = f"{section}.{key}" if nested else key
        if value and (section if nested else key) not in NOT_OVERRIDES and (section or not nested):
            found.append((name, value, comment or ""))
    return found


def help_text() -> str:
    config = (CONF / "config.yaml").read_text()
    chosen = defaults(config)
    width = max(len(g) for g in groups()) + 2
    lines = [
        "python -m transfer: transfer-learning experiments on causal language models, configured with Hydra",
        "",
        "usage:",
        "  python -m transfer [GROUP=OPTION ...] [KEY=VALUE ...]   one run, into outputs/<date>/<time>/",
        "  python -m transfer -m KEY=A,B [...]                     a sweep: a job per combination, into",
        "                                                          multirun/<date>/<time>/<job>/",
        "",
        "groups (GROUP=OPTION; * marks the default):",
    ]
    for group, options in groups().items():
        default = chosen.get(group, "").strip("[]").split(",")
        listed = ", ".join(f"{o}*" if o in default else o for o in options)
        lines.append(f"  {group:<{width}}{listed}")
        lines += [f"  {'':<{width}}{USE[group]}"] if group in USE else []
    lines += ["", "settings (KEY=VALUE; the default, and what it does):"]
    settings = overrides(config)
    width = max(len(f"{k}={v}") for k, v, _ in settings) + 2
    settings.append(("GROUP.KEY", "VALUE", "any key of a group's option: optimizer.lr=3e-4, strategy.r=16"))
    lines += [f"  {f'{k}={v}':<{width}}{comment}".rstrip() for k, v, comment in settings]
    lines += ["", MORE]
    return "\n".join(lines)


if __name__ == "__main__":
    from transfer.fmt import reader_may_leave

    if {"--help", "-h"} & set(sys.argv[1:]):
        status = reader_may_leave(lambda: print(help_text()))
    else:
        from transfer.cli import main

        status = reader_may_leave(main)
    if status:  # 0 returns: a caller through runpy (a test of what --help imports) goes on
        sys.exit(status)
