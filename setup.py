"""dtengine: DreamTeacher-style distillation of generative models into image backbones.

Two import packages are installed: `dtengine` (the engine) and `dtkernels` (the Triton kernels in ./kernels).
The kernels folder is installed under the name `dtkernels` because `kernels` on the package registry is an
unrelated, widely installed project; importing `kernels` must never pick up the wrong one.
"""

import re
from pathlib import Path

from setuptools import find_packages, setup

VERSION = re.search(r'__version__ = "(.+)"', Path(__file__).with_name("dtengine").joinpath("version.py").read_text())[1]

setup(
    name="dtengine",
    version=VERSION,
    description="Pretrain image backbones by distilling diffusion-model features (DreamTeacher)",
    python_requires=">=3.11",
    packages=find_packages(include=["dtengine", "dtengine.*"])
    + ["dtkernels"]
    + [f"dtkernels.{name}" for name in find_packages("kernels")],
    package_dir={"dtkernels": "kernels"},
    # The shipped teacher is data inside the package (no __init__.py in assets/), so list it as package data.
    package_data={"dtengine": ["assets/**/*.json", "assets/**/*.png", "assets/**/*.safetensors"]},
    include_package_data=False,
    install_requires=[
        "torch==2.14.1",  # the release the suite runs on; a local build label (+cu1xx) matches too
        "torchvision",
        "timm>=1.0.9",
        "diffusers>=0.30",
        "webdataset>=0.2.86",
        "braceexpand",
        "safetensors",
        "omegaconf>=2.3",
        "pyyaml",
        "numpy",
        "pillow",
        "simplejpeg",  # libjpeg-turbo without a PIL image in between: the wds loader's JPEG decoder
        "tqdm",
        "matplotlib",
        "tensorboard",
    ],
    extras_require={
        "dali": ["nvidia-dali-cuda130"],
        "xformers": ["xformers"],
        "latent": ["transformers>=4.40"],  # the empty-prompt embedding of latent_unet teachers, computed once
        "dev": ["pytest>=8", "ruff>=0.6", "transformers>=4.40"],  # the tests build a tiny CLIP text encoder
    },
    entry_points={"console_scripts": ["dtengine=dtengine.cli:main"]},
)
