import json

import pytest
import torch

from ssni.checkpoint import latest_checkpoint, load_checkpoint
from ssni.data import TensorImageDataset
from ssni.io import UnsafeCheckpointError, safe_torch_load
from ssni.models import create_model, model_spec
from ssni.training import DSMLoss, LoopConfig, NonFiniteLossError, OptimConfig, Trainer, heldout_dsm_loss


def _trainer(tmp_path, ds, steps, name="run", ckpt_every=0, lr=2e-3):
    torch.manual_seed(0)
    model = create_model("unet_tiny")
    loop = LoopConfig(steps=steps, batch_size=8, seed=3, ema_decay=0.9, ckpt_every=ckpt_every,
                      log_every=5, progress=False, device="cpu")
    return Trainer(model, DSMLoss(), ds, loop, OptimConfig(lr=lr, warmup_steps=3),
                   tmp_path / name, model_spec(model))


def _ds(tiny_images):
    x, y = tiny_images
    return TensorImageDataset(x, y, 4)


def test_dsm_loss_falls_on_tiny_data(tmp_path, tiny_images):
    ds = _ds(tiny_images)
    tr = _trainer(tmp_path, ds, 60)
    before = heldout_dsm_loss(tr.model, ds, draws=4)
    tr.fit()
    after = heldout_dsm_loss(tr.model, ds, draws=4)
    assert after < 0.8 * before


def test_resumed_run_equals_uninterrupted(tmp_path, tiny_images):
    ds = _ds(tiny_images)
    full = _trainer(tmp_path, ds, 12, "full")
    full.fit()
    part = _trainer(tmp_path, ds, 12, "part", ckpt_every=5)
    part.fit(stop_at=7)  # "killed" after step 7; the last checkpoint is at step 5
    assert json.loads((tmp_path / "part/checkpoints/latest.json").read_text())["step"] == 7
    resumed = _trainer(tmp_path, ds, 12, "part", ckpt_every=5)
    resumed.fit()
    for (k, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=k)
    for a, b in zip(full.ema.state_dict().values(), resumed.ema.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_resume_from_mid_checkpoint_equals_uninterrupted(tmp_path, tiny_images):
    ds = _ds(tiny_images)
    full = _trainer(tmp_path, ds, 10, "full")
    full.fit()
    # a run that died between checkpoints: only the step-5 checkpoint survived
    part = _trainer(tmp_path, ds, 10, "part", ckpt_every=5)
    part.fit(stop_at=5)
    resumed = _trainer(tmp_path, ds, 10, "part")
    assert resumed.try_resume() and resumed.step == 5
    resumed.fit()
    for a, b in zip(full.model.state_dict().values(), resumed.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_non_finite_loss_stops_and_keeps_checkpoint(tmp_path, tiny_images):
    ds = _ds(tiny_images)
    tr = _trainer(tmp_path, ds, 20, ckpt_every=2)

    calls = {"n": 0}
    base = tr.loss_fn

    def flaky(net, batch, g):
        calls["n"] += 1
        loss = base(net, batch, g)
        return loss * float("nan") if calls["n"] > 4 else loss

    tr.loss_fn = flaky
    with pytest.raises(NonFiniteLossError, match="step 4"):
        tr.fit()
    good = latest_checkpoint(tmp_path / "run/checkpoints")
    model = create_model("unet_tiny")
    state = load_checkpoint(good, model)
    assert state["step"] == 4
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_pickled_object_in_checkpoint_is_refused(tmp_path, tiny_images):
    tr = _trainer(tmp_path, _ds(tiny_images), 2, ckpt_every=2)
    tr.fit()
    ck = latest_checkpoint(tmp_path / "run/checkpoints")
    # replace the optimizer state with a pickled arbitrary object
    torch.save({"state": {}, "evil": _Evil()}, ck / "optimizer.pt")
    with pytest.raises(UnsafeCheckpointError, match=r"holds the Python object builtins\.print, not tensors"):
        safe_torch_load(ck / "optimizer.pt")
    with pytest.raises(UnsafeCheckpointError):
        load_checkpoint(ck, create_model("unet_tiny"), optimizer=tr.optimizer)


class _Evil:
    def __reduce__(self):
        return (print, ("this must never run",))
