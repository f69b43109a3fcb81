"""Smoke test of tools/bench_attacks.py on a tiny run directory laid out as `ssni demo` writes it."""
import json

import torch
from conftest import load_tool
from torch import nn

from ssni.data import DataConfig, build_dataset
from ssni.io import atomic_save_safetensors, atomic_write_json
from ssni.models import classifier_spec, create_classifier, create_model, save_model
from ssni.scoring import ScoreNormConfig, calibrate


def _tool():
    return load_tool("bench_attacks")


def test_nfe_counter_counts_forward_recomputation_and_backward_rows():
    tool = _tool()
    net = nn.Linear(3, 3)
    x = torch.randn(5, 3, requires_grad=True)
    with tool.NFECounter(net, net) as c:  # the same network given twice is counted once
        net(x).sum().backward()
        with torch.no_grad():
            net(x[:2])
        torch.utils.checkpoint.checkpoint(net, x, use_reentrant=False).sum().backward()
    net(x)  # outside the context: not counted
    assert (c.forward, c.backward) == (5 + 2 + 5 + 5, 5 + 5)


def test_bench_attacks_smoke(tmp_path):
    run = tmp_path / "demo"
    torch.manual_seed(0)
    sm = create_model("unet_tiny")
    with torch.no_grad():
        for p in sm.parameters():
            p.add_(0.02 * torch.randn_like(p))
    save_model(run / "score", sm)
    train = build_dataset(DataConfig(image_size=8), "train")
    cal, _ = calibrate(sm.eval(), train.images[:32], ScoreNormConfig(timesteps=4), batch_size=32)
    cal.save(run / "calibration" / "calibration.json")
    clf = create_classifier("resnet10t", in_chans=1, num_classes=10, image_size=8)
    atomic_save_safetensors(run / "classifier" / "model.safetensors", clf.state_dict())
    atomic_write_json(run / "classifier" / "model.json", classifier_spec(clf))
    out = tmp_path / "bench"
    res = _tool().main([
        "--run-dir", str(run), "--out", str(out), "--n", "3", "--draws", "2", "--iters", "1", "--eot", "2",
        "--device", "cpu", "--families", "pgd-eot1", "pgd-eot", "bpda", "adaptive", "fixed-seeds",
        "--defense-overrides", "score_norm.timesteps=4", "score_weights=model", "classifier.weights=model",
        "purifier.sampler=ddpm", "purifier.steps=2", "attack_purifier.steps=1", "device=cpu"])
    assert {p.name for p in out.iterdir()} == {"results.json", "table.md", "acc_vs_nfe.png"}
    rows = {r["family"]: r for r in json.loads((out / "results.json").read_text())["rows"]}
    assert rows.keys() == {"pgd-eot1", "pgd-eot", "bpda", "adaptive", "fixed-seeds"}
    assert res["rows"][0]["iterations"] == 1 and len(rows["pgd-eot"]["per_draw"]) == 2
    # per image and gradient: score norm 4 forward (no gradient: t* is rounded), and per purifier step one
    # forward, its recomputation in the backward pass (checkpointing) and one backward
    full = rows["pgd-eot1"]
    assert full["backward_per_image"] >= 1
    assert full["forward_per_image"] == 4 + 2 * full["backward_per_image"]
    assert full["nfe_per_image"] == full["forward_per_image"] + full["backward_per_image"]
    assert rows["pgd-eot"]["nfe_per_image"] == 2 * full["nfe_per_image"]  # EOT 2
    assert rows["fixed-seeds"]["nfe_per_image"] == full["nfe_per_image"]
    assert rows["bpda"]["backward_per_image"] == 0  # identity backward: no pass through the network
    assert rows["adaptive"]["backward_per_image"] > rows["pgd-eot"]["backward_per_image"]  # through the score norm
    for r in rows.values():
        assert 0 <= r["worst"] <= r["expected"] <= 1
