import json

import pytest
import yaml

from ssni.cli import main
from ssni.commands import COMMANDS
from ssni.commands.train_score import ScoreTrainConfig
from ssni.config import ConfigError, load_config
from ssni.data import DataConfig, build_dataset


def test_unknown_key_names_it(tmp_path):
    with pytest.raises(ConfigError, match="loop.stpes"):
        load_config(ScoreTrainConfig, None, ["loop.stpes=3"])
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump({"data": {"name": "digits", "colour": 1}}))
    with pytest.raises(ConfigError, match=r"data.colour.*valid keys.*image_size"):
        load_config(ScoreTrainConfig, p, [])


def test_overrides_are_typed_and_nested():
    cfg = load_config(ScoreTrainConfig, "recipes/score/digits.yaml",
                      ["loop.steps=7", "optim.lr=0.5", "model.kwargs.ch=8"])
    assert cfg.loop.steps == 7 and cfg.optim.lr == 0.5 and cfg.model.kwargs == {"ch": 8}
    with pytest.raises(ConfigError, match="integer"):
        load_config(ScoreTrainConfig, None, ["loop.steps=abc"])


def test_overrides_address_list_items():
    from ssni.evaluate.runner import EvaluateConfig

    base = load_config(EvaluateConfig, "recipes/eval/digits.yaml")
    cfg = load_config(EvaluateConfig, "recipes/eval/digits.yaml",
                      ["attacks.0.eot=2", "attacks.-1.kwargs.steps=3", "defenses.1.name=dbp2"])
    assert cfg.attacks[0].eot == 2 and cfg.attacks[1].eot == base.attacks[1].eot
    assert cfg.attacks[-1].kwargs == {**base.attacks[-1].kwargs, "steps": 3}
    assert cfg.attacks[0].kwargs == base.attacks[0].kwargs  # untouched items keep their values
    assert [d.name for d in cfg.defenses][:2] == ["none", "dbp2"]
    with pytest.raises(ConfigError, match=r"attacks.7: index out of range.*2 items"):
        load_config(EvaluateConfig, "recipes/eval/digits.yaml", ["attacks.7.eot=2"])


def test_every_recipe_loads_with_its_command():
    """Each recipe parses into the config of its command (named in its usage comment, or by
    its folder)."""
    import pathlib
    import re

    by_folder = {"score": "train-score", "classifier": "train-classifier", "eval": "evaluate",
                 "calibrate": "calibrate", "reweight": "fit-reweight", "purify": "purify",
                 "denoiser": "train-denoiser"}
    checked = 0
    for path in sorted(pathlib.Path("recipes").glob("*/*.yaml")):
        text = path.read_text()
        named = re.search(r"ssni ([a-z-]+) " + re.escape(str(path)), text)
        cmd = named.group(1) if named else by_folder.get(path.parent.name)
        if path.parent.name == "defense" or path.name.startswith("defense"):
            from ssni.defense import DefenseConfig

            load_config(DefenseConfig, path, [])
            checked += 1
            continue
        assert cmd in COMMANDS, f"{path}: no command for this recipe"
        load_config(COMMANDS.meta(cmd)["config"], path, [])
        checked += 1
    assert checked >= 10


def test_missing_dataset_path_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_dataset(DataConfig(name="imagefolder", root=str(tmp_path / "nope")), "train")
    with pytest.raises(FileNotFoundError, match="cifar10"):
        build_dataset(DataConfig(name="cifar10", root=str(tmp_path / "nope")), "train")
    with pytest.raises(KeyError, match="digits"):
        build_dataset(DataConfig(name="mnistt"), "train")


def test_cli_reports_unknown_key_and_name(capsys):
    assert main(["train-score", "recipes/score/digits.yaml", "loop.nope=1"]) == 2
    assert "loop.nope" in capsys.readouterr().err
    assert main(["train-score", "model.name=bogus", "loop.steps=1"]) == 2
    assert "unet_digits" in capsys.readouterr().err


def test_cli_takes_a_first_override_whose_value_is_a_yaml_path(tmp_path, capsys):
    # `ssni demo score_recipe=X.yaml`: an override, not the demo's own recipe
    assert main(["demo", "score_recipe=recipes/score/nope.yaml", f"run_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert "recipe file not found: recipes/score/nope.yaml" in err and "score_recipe=" not in err


def test_cli_train_score_end_to_end(tmp_path):
    run = tmp_path / "s"
    rc = main(["train-score", "recipes/score/digits.yaml", f"run_dir={run}", "loop.steps=3",
               "model.name=unet_tiny", "data.image_size=8", "sample_count=4", "sample_steps=5",
               "loop.progress=false", "loop.device=cpu"])
    assert rc == 0
    assert (run / "config.yaml").is_file() and (run / "samples.png").is_file()
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["loop"]["steps"] == 3 and saved["model"]["name"] == "unet_tiny"
    from ssni.models import load_model

    m = load_model(run, weights="ema")
    assert m.input_shape == (1, 8, 8)


def test_cpu_threads_is_fixed_unless_auto_is_asked(monkeypatch):
    """The default thread count never follows the machine's load (it changes the numbers)."""
    import os

    from ssni import cli
    from ssni.cli import cpu_threads

    monkeypatch.setenv("SSNI_THREADS", "3")
    assert cpu_threads() == 3
    for bad in ("zero", "0", "-2", "1.5"):
        monkeypatch.setenv("SSNI_THREADS", bad)
        with pytest.raises(ValueError, match="SSNI_THREADS"):
            cpu_threads()
    monkeypatch.delenv("SSNI_THREADS")
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    for busy in (0, 3, 9):  # a busy machine does not change the default
        monkeypatch.setattr(cli, "_busy_cores", lambda busy=busy: busy)
        assert cpu_threads() == 4
    monkeypatch.setenv("SSNI_THREADS", "auto")  # opt-in: the idle cores
    monkeypatch.setattr(cli, "_busy_cores", lambda: 3)
    assert cpu_threads() == 1
    monkeypatch.setattr(cli, "_busy_cores", lambda: 9)
    assert cpu_threads() == 1
    monkeypatch.undo()
    assert 0 <= cli._busy_cores(0.05) <= (os.cpu_count() or 1)


def test_run_config_records_threads_and_resume_with_others_says_so(tmp_path, capsys):
    """config.yaml records the thread count; it still loads as a recipe and as a run config."""
    from dataclasses import dataclass

    import torch

    from ssni.config import check_same_run, load_config, read_run_config, read_run_runtime, save_config

    @dataclass
    class Cfg:
        run_dir: str = "x"
        lr: float = 0.1

    old = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        save_config(Cfg(), tmp_path)
        assert read_run_runtime(tmp_path)["threads"] == 2
        # the CPU kernels torch dispatched to: weights trained elsewhere can differ by them
        assert read_run_runtime(tmp_path)["cpu"] == torch.backends.cpu.get_cpu_capability()
        assert read_run_config(tmp_path) == {"run_dir": "x", "lr": 0.1}
        assert load_config(Cfg, tmp_path / "config.yaml") == Cfg()
        (tmp_path / "checkpoints").mkdir()
        torch.set_num_threads(1)
        check_same_run(Cfg(), tmp_path, "checkpoints")
        assert "started with 2 CPU threads, this process uses 1" in capsys.readouterr().err
    finally:
        torch.set_num_threads(old)


def test_cli_flushes_denormals():
    import torch

    if not torch.set_flush_denormal(False):
        pytest.skip("this CPU cannot flush denormals")
    try:
        assert torch.tensor([1e-323], dtype=torch.float64).item() != 0.0
        assert main(["train-score", "recipes/score/digits.yaml", "loop.nope=1"]) == 2  # after set-up
        assert torch.tensor([1e-323], dtype=torch.float64).item() == 0.0
    finally:
        torch.set_flush_denormal(False)


def test_check_same_run_refuses_finished_work_of_another_config(tmp_path):
    from ssni.commands.calibrate import CalibrateConfig
    from ssni.config import ConfigError, check_same_run, load_config, save_config

    cfg = load_config(CalibrateConfig, None, [f"output={tmp_path}", "count=300"])
    save_config(cfg, tmp_path)
    check_same_run(load_config(CalibrateConfig, None, ["count=999"]), tmp_path, "calibration.json")  # nothing done yet
    (tmp_path / "calibration.json").write_text("{}")
    check_same_run(cfg, tmp_path, "calibration.json")
    check_same_run(load_config(CalibrateConfig, None, ["count=300", "output=elsewhere", "progress=false"]),
                   tmp_path, "calibration.json")  # where it is written and progress bars do not count
    with pytest.raises(ConfigError, match=r"holds a run made with another config \(count: 300 -> 999, "
                                          r"data.reserve: 0 -> 5\); reusing it would mix the two"):
        check_same_run(load_config(CalibrateConfig, None, ["count=999", "data.reserve=5"]), tmp_path,
                       "calibration.json")
    # a config saved before a field existed: the field's default stands in for it
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    del saved["data"]["reserve"]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(saved))
    check_same_run(cfg, tmp_path, "calibration.json")


def test_a_finished_training_run_is_not_redone(tmp_path, capsys):
    """Rerunning a finished train-score says so and redraws nothing (its samples stay as they were)."""
    run = tmp_path / "s"
    args = ["train-score", "recipes/score/digits.yaml", f"run_dir={run}", "loop.steps=2", "model.name=unet_tiny",
            "data.image_size=8", "sample_count=4", "sample_steps=3", "loop.progress=false", "loop.device=cpu"]
    assert main(args) == 0
    samples = (run / "samples.png").stat().st_mtime_ns
    summary = (run / "summary.json").read_text()
    capsys.readouterr()
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "already holds a finished run of 2 steps" in out
    assert (run / "samples.png").stat().st_mtime_ns == samples and (run / "summary.json").read_text() == summary
    assert main(args[:3] + ["loop.steps=3"] + args[4:]) == 0  # more steps: it trains on
    assert json.loads((run / "summary.json").read_text())["steps"] == 3


def test_a_classifier_too_deep_for_the_image_size_fails_in_one_line(tmp_path, capsys):
    """convnext_atto's stem and stages need more than 16x16 pixels: said before training, in one line."""
    rc = main(["train-classifier", "recipes/classifier/digits_resnet18.yaml", f"run_dir={tmp_path / 'c'}",
               "model.name=convnext_atto", "loop.steps=1", "loop.progress=false", "loop.device=cpu"])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert "classifier convnext_atto does not take 16x16 images" in err and "data.image_size" in err
    assert not (tmp_path / "c" / "checkpoints").exists()


def test_a_missing_optional_extra_is_one_line_not_a_traceback(capsys, monkeypatch):
    """The robustbench source without the package printed 22 lines of traceback around a clear message."""
    from ssni.commands import COMMANDS

    def needs_extra(cfg):
        raise ImportError("the robustbench classifier source needs the optional extra: pip install 'ssni[robustbench]'")

    monkeypatch.setitem(COMMANDS._items, "evaluate", needs_extra)
    assert main(["evaluate", "recipes/eval/digits.yaml"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == ("ssni evaluate: error: the robustbench classifier source needs the optional extra: "
                           "pip install 'ssni[robustbench]'")
