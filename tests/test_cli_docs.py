"""README's list of `qpeft` verbs is the CLI's: a verb added to one and not the other fails here. The list is
read from `qpeft --help` run as a user runs it (the console script's module, as `python -m services.cli`)."""

import re
import subprocess
import sys

from tests.conftest import ROOT


def readme_verbs() -> set[str]:
    text = (ROOT / "README.md").read_text()
    m = re.search(r"^- CLI `qpeft`: (.*?)(?=\n\n|\n- )", text, re.S | re.M)
    assert m, "README has no '- CLI `qpeft`: ...' item"
    return {code.split()[0] for code in re.findall(r"`([^`]+)`", m.group(1)) if not code.startswith("QPEFT_")}


def cli_verbs() -> set[str]:
    help_text = subprocess.run(
        [sys.executable, "-m", "services.cli", "--help"],
        capture_output=True,
        text=True,
        env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"},
        check=True,
    ).stdout
    commands = help_text.split("Commands", 1)[1]
    return set(re.findall(r"^│ (\S+)\s{2,}", commands, re.M))


def test_readme_lists_every_cli_verb():
    assert readme_verbs() == cli_verbs()
