"""The repository's contracts: CI runs the README's test command."""

from __future__ import annotations

import re

from conftest import REPO


def test_ci_runs_the_readme_test_command():
    readme = (REPO / "README.md").read_text()
    commands = re.findall(r"^(pip install -e \"\.\[test\]\".*)$", readme, flags=re.M)
    assert len(commands) == 1, commands
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    assert commands[0] in ci
