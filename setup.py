"""Installs the ssni toolkit (import name `ssni`, sources under toolkit/)."""
from setuptools import find_packages, setup

setup(
    name="ssni",
    version="0.1.0",
    description="Diffusion-based adversarial purification with sample-specific noise injection, "
    "and typical-set training for robust denoisers and score networks.",
    license="Apache-2.0",
    package_dir={"": "toolkit"},
    packages=find_packages("toolkit"),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.1",
        "torchvision",
        "timm>=0.9",
        "einops",
        "tensorboard",
        "pyyaml",
        "safetensors",
        "numpy",
        "tqdm",
        "scikit-learn",
        "scikit-image",
        "matplotlib",
    ],
    extras_require={
        "test": ["pytest", "ruff", "torchattacks"],  # torchattacks (MIT): cross-checks in tests/test_torchattacks.py
        "bench": ["torchsde>=0.2.6"],  # tools/bench_reference.py: the DiffPure-style reference (Apache-2.0)
        "diffusers": ["diffusers>=0.20"],  # the "diffusers" pretrained format (UNet2DModel folders)
        "autoattack": ["pyautoattack>=0.2"],  # the `autoattack` attack: AutoAttack on a defense view (MIT)
        # robustbench 1.1.1 from the package index (it pins timm==1.0.9 and pulls pyautoattack, pandas, gdown, ...); it
        # imports pkg_resources, gone from setuptools 81 on (ssni works around its `autoattack` import: robustbench_zoo.py)
        "robustbench": ["robustbench>=1.1.1,<1.2", "setuptools<81"],
    },
    entry_points={"console_scripts": ["ssni=ssni.cli:main"]},
)
