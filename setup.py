"""seg4diff-fast: fused text-image attention capture for MM-DiT models, and Seg4Diff segmentation."""
from setuptools import setup

setup(
    name="seg4diff-fast",
    version="0.1.0",
    description=(
        "Fused Triton joint attention that streams the text-image attention probabilities of MM-DiT "
        "models (SD3, SD3.5, Flux), diffusers capture processors and Seg4Diff open-vocabulary segmentation."
    ),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # kernels/ is a top-level folder of the repository, installed as the subpackage seg4diff_fast.kernels.
    # It must never be installed as a top-level `kernels` module: that name is another PyPI package.
    packages=[
        "seg4diff_fast",
        "seg4diff_fast.kernels",
        "seg4diff_fast.bench",
        "seg4diff_fast.capture",
        "seg4diff_fast.capture.families",
        "seg4diff_fast.segmentation",
        "seg4diff_fast.magnet",
    ],
    package_dir={"seg4diff_fast.kernels": "kernels"},
    # Lower bounds: the oldest releases that pass (CI installs them from .ci/oldest.txt and runs a smoke subset;
    # tests/test_layout.py keeps the two in step). torch's cannot be tested on a CPU machine (2.13 is the only CPU
    # build served): 2.8 is the release that pins triton 3.4, the oldest triton the kernels work with.
    install_requires=[
        "torch>=2.8",
        "triton>=3.4; platform_system == 'Linux'",
        "numpy",
        "safetensors",
        "pillow",
        "tqdm",
    ],
    extras_require={
        # matplotlib: the colour map of the heatmaps that segment / generate write;
        # scipy: the Hungarian matching of the unsupervised evaluation (eval --unsupervised)
        "diffusers": ["diffusers>=0.42", "transformers>=5.0", "accelerate>=1.0", "matplotlib", "scipy"],
        "test": [
            "pytest",
            "setuptools>=77.0.3",  # tests/test_layout.py builds the wheel (pip wheel --no-build-isolation)
            "pytest-benchmark",
            "hypothesis",
            "diffusers>=0.42",
            "transformers>=5.0",
            "accelerate>=1.0",
            "peft>=0.18",
            "matplotlib",
            "scipy",
            "av",  # the video-file tests (the `video` extra; a ~36 MB wheel)
        ],
        # `segment --video` on video files (MP4, WebM, MKV, ...) through PyAV; GIF / WebP / APNG need only PIL
        "video": ["av"],
        # MAGNET fine-tuning (seg4diff_fast.magnet): peft for the LoRA, scipy for the Hungarian matching
        "train": ["diffusers>=0.42", "transformers>=5.0", "accelerate>=1.0", "peft>=0.18", "scipy"],
        "plot": ["matplotlib"],
    },
    entry_points={"console_scripts": ["seg4diff-fast=seg4diff_fast.cli:main"]},
)
