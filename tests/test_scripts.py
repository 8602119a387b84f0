"""The shell scripts parse, and call only dtengine commands and options that exist."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from dtengine.cli import build_parser

SCRIPTS = sorted((Path(__file__).parent.parent / "scripts").glob("*.sh"))


def test_scripts_parse():
    assert SCRIPTS, "no scripts found"
    for script in SCRIPTS:
        proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert proc.returncode == 0, f"{script.name}: {proc.stderr}"


def test_scripts_use_existing_commands_and_flags():
    subcommands = build_parser()._subparsers._group_actions[0].choices
    for script in SCRIPTS:
        text = script.read_text().replace("\\\n", " ")
        for command, rest in re.findall(r'"\$dtengine" ([a-z-]+)([^\n]*)', text):
            assert command in subcommands, f"{script.name}: unknown command {command}"
            known = {flag for action in subcommands[command]._actions for flag in action.option_strings}
            for flag in re.findall(r"(?<!\w)(--[a-z-]+)", rest):
                assert flag in known, f"{script.name}: dtengine {command} has no {flag}"
