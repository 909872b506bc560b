"""The README's two fresh-machine commands are what users and CI run: keep them in step."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands():
    return re.findall(r"```\n(.*?)\n```", (ROOT / "README.md").read_text(), flags=re.S)[:2]


def test_readme_opens_with_install_and_demo_then_install_and_test():
    demo, test = readme_commands()
    for command in (demo, test):
        assert "\n" not in command, "each fresh-machine command is one line"
        assert "apt-get install -y -qq dataset-fashion-mnist" in command
        assert "torch==2.13.0" in command
    assert demo.endswith("backdoor-engine demo")
    assert test.endswith("python -m pytest")


def test_ci_runs_the_readme_test_command_verbatim():
    _, test = readme_commands()
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test in ci_lines
    assert "set -euo pipefail" in ci_lines
