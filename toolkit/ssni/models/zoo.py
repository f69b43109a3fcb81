"""The registered score networks: tiny (tests), digits and Fashion-MNIST (small), CIFAR-10 DDPM++ size class."""
from .factory import register_model
from .unet import UNet

register_model("unet_tiny", UNet, dict(in_channels=1, image_size=8, ch=16, ch_mult=(1, 2),
                                       num_res_blocks=1, attn_resolutions=(4,), dropout=0.0),
               kind="score", test=True)
register_model("unet_digits", UNet, dict(in_channels=1, image_size=16, ch=32, ch_mult=(1, 2, 2),
                                         num_res_blocks=1, attn_resolutions=(4,), dropout=0.0),
               kind="score")
# Fashion-MNIST / MNIST at 28x28 (28 -> 14 -> 7), sized for a 2-core CPU.
register_model("unet_fmnist", UNet, dict(in_channels=1, image_size=28, ch=32, ch_mult=(1, 2, 2),
                                         num_res_blocks=1, attn_resolutions=(7,), dropout=0.0),
               kind="score")
# Same size class as the public CIFAR-10 VP DDPM++ (continuous) model: nf=128, ch_mult
# (1, 2, 2, 2), 4 residual blocks per level, attention at 16x16.
register_model("ddpmpp_cifar10", UNet, dict(in_channels=3, image_size=32, ch=128,
                                            ch_mult=(1, 2, 2, 2), num_res_blocks=4,
                                            attn_resolutions=(16,), dropout=0.1),
               kind="score")
