"""The README as a newcomer reads it: every `ssni` command it shows builds its config as written,
and the Python tour runs (on tiny networks made where the demo would put them)."""
import re
import shlex
from pathlib import Path

import pytest

from ssni.cli import _looks_like_override, main
from ssni.commands import COMMANDS
from ssni.config import load_config

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def _blocks(lang: str):
    """The README's fenced code blocks of one language."""
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


def readme_commands():
    """Every `ssni COMMAND ...` in an inline code span or a bash block (placeholders left out)."""
    found = re.findall(r"`(ssni [a-z][^`]*)`", README)
    for block in _blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("#", 1)[0].strip()
            m = re.search(r"(?:^|\s)(?:bash tools/venv\.sh\s+)?(ssni(?:\.cli)?\s+[a-z][\w-]*.*)$", line)
            if m and "$" not in m.group(1):
                found.append(m.group(1).replace("ssni.cli", "ssni"))
    return sorted({c.strip() for c in found if "COMMAND" not in c and "<" not in c})


def test_the_readme_shows_commands():
    assert len(readme_commands()) >= 15  # the extraction itself works


@pytest.mark.parametrize("line", readme_commands())
def test_every_readme_command_builds_its_config(line, monkeypatch):
    """Each command line loads its recipe and overrides: names, keys, types and values as written."""
    monkeypatch.chdir(ROOT)
    words = shlex.split(line)[1:]
    name = words[0]
    if name == "options":  # lists registered parts: it runs as written
        assert main(words) == 0
        return
    assert name in COMMANDS.names(), f"README names an unknown command: {line}"
    recipe = words[1] if len(words) > 1 and not _looks_like_override(words[1]) else None
    overrides = words[2:] if recipe else words[1:]
    load_config(COMMANDS.meta(name)["config"], recipe, overrides)


def _tiny_demo_networks(root: Path) -> None:
    """The three files the tour reads, as `ssni demo` lays them out, trained for a few steps."""
    common = ["loop.progress=false", "loop.device=cpu"]
    assert main(["train-score", "recipes/score/digits.yaml", f"run_dir={root / 'score'}", "loop.steps=2",
                 "sample_count=2", "sample_steps=2", "eval_draws=1", *common]) == 0
    assert main(["train-classifier", "recipes/classifier/digits_resnet18.yaml", f"run_dir={root / 'classifier'}",
                 "model.name=resnet10t", "loop.steps=2", *common]) == 0
    assert main(["calibrate", "recipes/calibrate/digits.yaml", f"output={root / 'calibration'}",
                 f"score_model={root / 'score'}", "count=16", "score_norm.timesteps=5", "progress=false",
                 "device=cpu"]) == 0


def test_the_python_tour_runs_as_written(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    _tiny_demo_networks(tmp_path / "runs" / "demo")
    tour = next(b for b in _blocks("python") if "runs/demo/score" in b)
    monkeypatch.chdir(tmp_path)  # the tour's relative paths: runs/demo/...
    capsys.readouterr()
    exec(compile(tour, "README.md (Python tour)", "exec"), {"__name__": "__readme__"})
    out = capsys.readouterr().out
    assert "noised: [2, 1, 16, 16]" in out
    from ssni.models import list_models

    assert str(list_models(kind="score")) in out and str(list_models(kind="score")) in tour
    robust = re.search(r"after PGD-EOT: (\d) of 8; largest change: ([\d.]+)", out)
    assert robust and float(robust.group(2)) <= 16 / 255 + 1e-6
