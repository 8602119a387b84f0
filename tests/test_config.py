"""Config: YAML + dotted overrides, typed, unknown keys named with the closest valid one."""

from __future__ import annotations

from pathlib import Path

import pytest

from dtengine import RunConfig, load_config
from dtengine.runtime.config import config_to_yaml
from dtengine.runtime.errors import ConfigError

DEMO = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"


def test_demo_config_loads_and_overrides_apply():
    cfg = load_config(DEMO, ["train.steps=7", "out_dir=/tmp/x", "optim.lr=1e-3", "teacher.blocks=[0,1]"])
    assert isinstance(cfg, RunConfig)
    assert cfg.train.steps == 7 and cfg.out_dir == "/tmp/x" and cfg.optim.lr == pytest.approx(1e-3)
    assert cfg.teacher.blocks == [0, 1]
    assert cfg.student.model == "resnet18"


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(DEMO, ["train.steps=11"])
    path = tmp_path / "config.yaml"
    path.write_text(config_to_yaml(cfg))
    assert load_config(path) == cfg


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.stpes=3", "unknown config key 'train.stpes'; did you mean 'train.steps'?"),
        ("trian.steps=3", "unknown config key 'trian'; did you mean 'train'?"),
        ("train.steps=abc", "config key 'train.steps' has the wrong type"),
        ("optim.name=sgd", "optim.name must be one of"),
        ("data.on_corrupt=ignore", "data.on_corrupt"),
        ("teacher.feature_point=middle", "teacher.feature_point"),
        ("train.steps", "not of the form key=value"),
    ],
)
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError) as info:
        load_config(DEMO, [override])
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("student:\n  modle: resnet50\n")
    with pytest.raises(ConfigError, match="did you mean 'student.model'"):
        load_config(unknown)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(listy)


@pytest.mark.parametrize("path", sorted(DEMO.parent.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_is_valid(path):
    assert isinstance(load_config(path), RunConfig)


def test_every_run_config_key_is_documented():
    """docs/configuration.md lists every key of the distill config (a new field without a line there fails)."""
    from dataclasses import fields, is_dataclass

    text = (DEMO.parent.parent / "docs" / "configuration.md").read_text()

    def keys(node, prefix: str) -> list[str]:  # leaves only: a nested section (teacher.adm) lists its own keys
        if not is_dataclass(node):
            return [prefix]
        return [key for f in fields(node) for key in keys(getattr(node, f.name), f"{prefix}.{f.name}".lstrip("."))]

    missing = [key for key in keys(RunConfig(), "") if f"`{key}`" not in text]
    assert missing == []


def test_text_overrides_are_taken_as_typed():
    cfg = load_config(DEMO, ["train.profile_steps=10:12", "data.shards=/data/a:b/shard-{0..3}.tar"])
    assert cfg.train.profile_steps == "10:12" and cfg.data.shards == "/data/a:b/shard-{0..3}.tar"
