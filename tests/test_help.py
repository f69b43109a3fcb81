"""The toolkit explains its own options: --help lists a command's keys, --print-config its resolved
config, `ssni options` every registered part and its options."""
import pytest
import yaml

from ssni.cli import main
from ssni.commands import COMMANDS
from ssni.config import load_config, to_dict
from ssni.registry import REGISTRIES


@pytest.mark.parametrize("command", COMMANDS.names())
def test_print_config_prints_the_resolved_config_and_runs_nothing(command, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing may be written: the directory stays empty
    cls = COMMANDS.meta(command)["config"]
    assert main([command, "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed == to_dict(load_config(cls, None, []))
    assert list(tmp_path.iterdir()) == []


def test_print_config_applies_the_recipe_and_overrides(capsys):
    assert main(["train-score", "recipes/score/digits.yaml", "loop.steps=7", "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["loop"]["steps"] == 7 and printed["data"]["reserve"] == 384  # override and recipe


@pytest.mark.parametrize("command", COMMANDS.names())
def test_help_lists_every_top_level_key_and_a_real_example(command, capsys):
    import dataclasses
    import re

    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    fields = [f.name for f in dataclasses.fields(COMMANDS.meta(command)["config"])]
    for name in fields:
        assert re.search(rf"^  {name} ", out, flags=re.M), (command, name)
    example = re.search(rf"example: ssni {command} RECIPE (\w+)=", out)
    assert example and example.group(1) in fields  # the example is a key this command has
    assert "loop.steps=100" not in out


@pytest.mark.parametrize("kind", sorted(REGISTRIES))
def test_options_lists_every_registered_part_and_its_options(kind, capsys):
    registry = REGISTRIES[kind]
    assert main(["options", kind.replace(" ", "-")]) == 0
    out = capsys.readouterr().out
    assert all(n in out for n in registry.names())
    for name in registry.names():
        assert main(["options", kind.replace(" ", "-"), name]) == 0
        out = capsys.readouterr().out
        assert all(f"  {opt} " in out or out.endswith(f"  {opt}\n") or f"  {opt}  " in out
                   for opt in registry.options(name)), (kind, name, out)


def test_options_shows_defaults_and_refuses_unknown_names(capsys):
    assert main(["options", "sampler", "ddpm"]) == 0
    out = capsys.readouterr().out
    assert "steps" in out and "clip   true" in out
    assert main(["options", "sampler", "nope"]) == 2
    assert "unknown sampler 'nope'; valid choices: ddim, ddpm" in capsys.readouterr().err
    assert main(["options", "samplerz"]) == 2
    assert "unknown kind 'samplerz'; kinds: attack" in capsys.readouterr().err
