"""The shell scripts parse, and call only dtengine commands and options that exist."""

from __future__ import annotations

import os
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


def test_evidence_script_runs_the_documented_commands(tmp_path):
    """With a stand-in for dtengine that records its arguments, the script's command sequence is checked."""
    fake = tmp_path / "dtengine"
    fake.write_text(f'#!/usr/bin/env bash\necho "$*" >> {tmp_path}/calls.txt\n')
    fake.chmod(0o755)
    script = Path(__file__).parent.parent / "scripts" / "distillation_evidence.sh"
    env = {**os.environ, "DTENGINE": str(fake), "STEPS": "7", "MIXED_STEPS": "5", "SEEDS": "2"}
    out = tmp_path / "runs" / "evidence"
    proc = subprocess.run(
        ["bash", str(script), str(out)], capture_output=True, text=True, env=env, cwd=script.parent.parent
    )
    assert proc.returncode == 0, proc.stderr
    calls = (tmp_path / "calls.txt").read_text().splitlines()
    distills = sorted(c for c in calls if c.startswith("distill"))
    assert len(distills) == 4
    assert sorted("train.steps=7" in c for c in distills) == [False, False, True, True]
    assert all("train.steps=5" in c for c in distills if "demo_mixed" in c)
    assert sum("teacher.weights=untrained" in c for c in calls) == 3  # control distill, its interpreter, its mixed run
    assert calls[-1].startswith(f"eval --checkpoint {out}/feature") and "--seeds 2" in calls[-1]
    assert calls[-1].count("--compare") == 3 and (out / "logs").is_dir()
