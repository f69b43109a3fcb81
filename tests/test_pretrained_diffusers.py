"""The "diffusers" format: UNet2DModel folders written by diffusers' save_pretrained load as EpsModels.

Tiny random UNet2DModels saved by diffusers itself stand in for the public checkpoints. The tests that
need diffusers (an optional extra) skip without it (and fail with CI=true: CI installs it); the message
for a missing extra is checked always.
"""
import json
import re
import socket
import sys

import pytest
import torch

from ssni.models import PRETRAINED_FORMATS, VPBackbone, load_pretrained
from ssni.models.diffusers_unet import check_unet_config, rename_deprecated_attention
from ssni.purify import Purifier
from ssni.scoring import ScoreNorm


def _diffusers():
    from conftest import need_extra

    return need_extra("diffusers", "diffusers")


def _tiny_unet(in_channels=3, out_channels=None, attention=False, seed=0):
    """A small random UNet2DModel (8x8 images, two levels, optional attention at the lower one)."""
    diffusers = _diffusers()
    torch.manual_seed(seed)
    down = ("DownBlock2D", "AttnDownBlock2D" if attention else "DownBlock2D")
    up = ("AttnUpBlock2D" if attention else "UpBlock2D", "UpBlock2D")
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=in_channels, out_channels=out_channels or in_channels,
                                 block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
                                 down_block_types=down, up_block_types=up)
    return unet.eval()


def _save_pipeline(unet, folder, **scheduler):
    """A pipeline layout: folder/unet/ and folder/scheduler/scheduler_config.json (diffusers' own writers)."""
    diffusers = _diffusers()
    unet.save_pretrained(folder / "unet")
    diffusers.DDPMScheduler(**scheduler).save_pretrained(folder / "scheduler")
    return folder


def _rel_l2(a, b):
    return ((a - b).norm() / b.norm()).item()


def _check_outputs(model, unet, channels):
    """model(x, t = (i + 1) / N) equals unet(x, i).sample (eps channels) for several steps in one batch."""
    steps = torch.tensor([0, 1, 17, 250, 500, 999])
    x = torch.randn(len(steps), channels, 8, 8, generator=torch.Generator().manual_seed(1))
    t = (steps + 1).float() / 1000  # discrete step i is t = (i + 1) / N
    with torch.no_grad():
        eps = model(x, t)
        ref = unet(x, steps).sample[:, :channels]
    assert eps.shape == (len(steps), channels, 8, 8)
    assert _rel_l2(eps, ref) <= 1e-6
    return _rel_l2(eps, ref)


# google/ddpm-cifar10-32's unet/config.json (written by diffusers 0.0.4; the DDPM CIFAR-10 model)
DDPM_CIFAR10_CONFIG = {
    "_class_name": "UNet2DModel", "_diffusers_version": "0.0.4", "act_fn": "silu", "attention_head_dim": None,
    "block_out_channels": [128, 256, 256, 256], "center_input_sample": False,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"], "downsample_padding": 0,
    "flip_sin_to_cos": False, "freq_shift": 1, "in_channels": 3, "layers_per_block": 2, "mid_block_scale_factor": 1,
    "norm_eps": 1e-06, "norm_num_groups": 32, "out_channels": 3, "sample_size": 32, "time_embedding_type": "positional",
    "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"]}


def test_format_is_registered():
    assert "diffusers" in PRETRAINED_FORMATS.names()


def test_missing_extra_is_one_clear_line(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "diffusers", None)  # `import diffusers` now fails as if not installed
    with pytest.raises(ImportError, match=re.escape("needs the optional extra: pip install 'ssni[diffusers]'")) as info:
        load_pretrained(tmp_path, "diffusers")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("in_channels, out_channels, binary", [(3, 3, False), (1, 1, True), (3, 6, False)])
def test_unet_folder_matches_the_unet(tmp_path, in_channels, out_channels, binary):
    unet = _tiny_unet(in_channels, out_channels)
    unet.save_pretrained(tmp_path / "unet", safe_serialization=not binary)
    assert (tmp_path / "unet" / f"diffusion_pytorch_model.{'bin' if binary else 'safetensors'}").is_file()
    model = load_pretrained(tmp_path / "unet", "diffusers")
    assert isinstance(model, VPBackbone) and not model.training
    assert model.input_shape == (in_channels, 8, 8) and model.time_input == "step_index"
    assert model.diffusion.N == 1000  # no scheduler config: DDPMScheduler's defaults
    own, ref = model.backbone.unet.state_dict(), unet.state_dict()
    assert own.keys() == ref.keys() and all(torch.equal(own[k], ref[k]) for k in ref)
    _check_outputs(model, unet, in_channels)  # a learned-variance model (6 channels) returns eps first


def test_ddpm_cifar10_config_is_accepted(tmp_path):
    """The public model's config passes our checks and builds the 35.7M-parameter DDPM U-Net (meta device)."""
    diffusers = _diffusers()
    assert check_unet_config(DDPM_CIFAR10_CONFIG, tmp_path / "config.json") == (3, 3, 32)
    with torch.device("meta"):  # names and shapes without allocating
        unet = diffusers.UNet2DModel.from_config(DDPM_CIFAR10_CONFIG)
    assert sum(p.numel() for p in unet.parameters()) == 35_746_307
    old = {k.replace(".to_q.", ".query.").replace(".to_out.0.", ".proj_attn."): v for k, v in unet.state_dict().items()}
    assert rename_deprecated_attention(old, unet.state_dict().keys()).keys() == unet.state_dict().keys()


def test_sharded_weights_load(tmp_path):
    unet = _tiny_unet()
    unet.save_pretrained(tmp_path / "unet", max_shard_size="100KB")
    assert (tmp_path / "unet" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    _check_outputs(load_pretrained(tmp_path / "unet", "diffusers"), unet, 3)


def test_pipeline_folder_schedule_is_the_schedulers(tmp_path):
    diffusers = _diffusers()
    schedule = dict(num_train_timesteps=500, beta_start=2e-4, beta_end=0.03, beta_schedule="linear")
    folder = _save_pipeline(_tiny_unet(), tmp_path / "pipe", **schedule)
    reference = diffusers.DDPMScheduler(**schedule).alphas_cumprod.double()
    for path in (folder, folder / "unet"):  # the pipeline folder and its unet folder read the same schedule
        model = load_pretrained(path, "diffusers")
        assert model.diffusion.N == 500
        torch.testing.assert_close(model.diffusion.discrete_alpha_bar, reference, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="not supported"):  # keyword arguments override the file
        load_pretrained(folder, "diffusers", beta_schedule="scaled_linear")


def test_ddpm_cifar10_schedule_and_keywords(tmp_path):
    diffusers = _diffusers()
    unet = _tiny_unet()
    unet.save_pretrained(tmp_path / "unet")
    reference = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02).alphas_cumprod
    default = load_pretrained(tmp_path / "unet", "diffusers")
    torch.testing.assert_close(default.diffusion.discrete_alpha_bar, reference.double(), rtol=0, atol=1e-6)
    assert (default.diffusion.beta_min, default.diffusion.beta_max) == pytest.approx((0.1, 20.0))
    given = load_pretrained(tmp_path / "unet", "diffusers", num_train_timesteps=200, beta_start=1e-3, beta_end=0.05)
    reference = diffusers.DDPMScheduler(num_train_timesteps=200, beta_start=1e-3, beta_end=0.05).alphas_cumprod
    torch.testing.assert_close(given.diffusion.discrete_alpha_bar, reference.double(), rtol=0, atol=1e-6)


def test_purifier_and_score_norm_run(tmp_path):
    unet = _tiny_unet()
    model = load_pretrained(_save_pipeline(unet, tmp_path / "pipe"), "diffusers")
    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = Purifier(model, "ddpm", steps=2)(x, 0.1, seeds=torch.tensor([3, 4]))
        norms = ScoreNorm(model, timesteps=2)(x, seeds=torch.tensor([3, 4]))
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert norms.shape == (2,) and torch.isfinite(norms).all() and (norms > 0).all()
    x.requires_grad_(True)  # full gradients flow through the purifier into the input
    Purifier(model, "ddpm", steps=2)(x, 0.1, seeds=torch.tensor([3, 4])).sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_old_attention_names_load(tmp_path):
    """Checkpoints saved before diffusers renamed query/key/value/proj_attn (the original DDPM uploads) load."""
    from safetensors.torch import save_file

    unet = _tiny_unet(attention=True)
    unet.save_pretrained(tmp_path / "unet")
    old = {}
    for key, value in unet.state_dict().items():
        for new, was in ((".to_q.", ".query."), (".to_k.", ".key."), (".to_v.", ".value."), (".to_out.0.", ".proj_attn.")):
            key = key.replace(new, was)
        old[key] = value.contiguous()
    assert any(".proj_attn." in k for k in old)
    save_file(old, str(tmp_path / "unet" / "diffusion_pytorch_model.safetensors"))
    _check_outputs(load_pretrained(tmp_path / "unet", "diffusers"), unet, 3)


def test_ema_and_model_weights_of_a_training_checkpoint(tmp_path):
    raw, ema = _tiny_unet(seed=0), _tiny_unet(seed=1)
    raw.save_pretrained(tmp_path / "ckpt" / "unet")
    ema.save_pretrained(tmp_path / "ckpt" / "unet_ema")
    _check_outputs(load_pretrained(tmp_path / "ckpt", "diffusers", weights="model"), raw, 3)
    _check_outputs(load_pretrained(tmp_path / "ckpt", "diffusers", weights="ema"), ema, 3)
    assert load_pretrained(tmp_path / "ckpt", "diffusers").config["loaded"] == "unet_ema"  # auto: EMA when present
    with pytest.raises(ValueError, match="one set of weights"):
        load_pretrained(tmp_path / "ckpt" / "unet", "diffusers", weights="ema")
    with pytest.raises(ValueError, match="weights='best'"):
        load_pretrained(tmp_path / "ckpt", "diffusers", weights="best")


@pytest.mark.parametrize("schedule", ["squaredcos_cap_v2", "scaled_linear"])
def test_non_linear_schedule_is_clear(tmp_path, schedule):
    folder = _save_pipeline(_tiny_unet(), tmp_path / "pipe", beta_schedule=schedule)
    with pytest.raises(ValueError, match=f"beta_schedule '{schedule}' .*only 'linear'") as info:
        load_pretrained(folder, "diffusers")
    assert "\n" not in str(info.value) and "scheduler_config.json" in str(info.value)


def test_other_predictions_and_unknown_options_are_clear(tmp_path):
    folder = _save_pipeline(_tiny_unet(), tmp_path / "pipe", prediction_type="v_prediction")
    with pytest.raises(ValueError, match="prediction_type 'v_prediction'"):
        load_pretrained(folder, "diffusers")
    with pytest.raises(ValueError, match=r"unknown diffusers option\(s\) \['beta_min'\]"):
        load_pretrained(folder, "diffusers", beta_min=0.1)


def test_hub_id_or_missing_folder_is_refused_without_download(tmp_path, monkeypatch):
    _diffusers()

    def no_network(*args, **kwargs):
        raise AssertionError("the loader tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.chdir(tmp_path)
    for path in ("google/ddpm-cifar10-32", tmp_path / "absent"):
        with pytest.raises(FileNotFoundError, match="not found.*nothing is downloaded") as info:
            load_pretrained(path, "diffusers")
        assert "\n" not in str(info.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="neither a UNet2DModel folder"):
        load_pretrained(tmp_path / "empty", "diffusers")


def test_folder_without_weights_or_with_foreign_weights_is_clear(tmp_path):
    unet = _tiny_unet()
    unet.save_pretrained(tmp_path / "unet")
    (tmp_path / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no diffusion_pytorch_model.safetensors or .bin"):
        load_pretrained(tmp_path / "unet", "diffusers")
    torch.save({"conv_in.weight": torch.zeros(1)}, tmp_path / "unet" / "diffusion_pytorch_model.bin")
    with pytest.raises(ValueError, match="does not fit the diffusers model: missing") as info:
        load_pretrained(tmp_path / "unet", "diffusers")
    first, rest = str(info.value).split("\n", 1)  # the keys first, the assumed format and options after
    assert "conv_in.weight" in first and "'diffusers'" in rest


class _Payload:
    """A pickled Python object that a weights-only load must refuse."""


def test_pickled_bin_is_refused(tmp_path):
    unet = _tiny_unet()
    unet.save_pretrained(tmp_path / "unet", safe_serialization=False)
    torch.save({**unet.state_dict(), "payload": _Payload()}, tmp_path / "unet" / "diffusion_pytorch_model.bin")
    with pytest.raises(RuntimeError, match="refusing to load .* the Python object test_pretrained_diffusers._Payload"):
        load_pretrained(tmp_path / "unet", "diffusers")


@pytest.mark.parametrize("change, match", [
    (dict(time_embedding_type="fourier"), "time_embedding_type 'fourier'"),
    (dict(num_class_embeds=10), "class-conditional"),
    (dict(out_channels=4), "out_channels 4"),
    (dict(_class_name="UNet2DConditionModel"), "UNet2DModel \\(unconditional\\) only"),
])
def test_unsupported_unets_are_clear(tmp_path, change, match):
    unet = _tiny_unet()
    unet.save_pretrained(tmp_path / "unet")
    config = json.loads((tmp_path / "unet" / "config.json").read_text())
    (tmp_path / "unet" / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(ValueError, match=match):
        load_pretrained(tmp_path / "unet", "diffusers")
