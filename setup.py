"""ncsn_tf: NCSNv2 (Song & Ermon, NeurIPS 2020) in TensorFlow/Keras 3."""
from setuptools import find_packages, setup

setup(
    name="ncsn_tf",
    version="0.1.0",
    description="NCSNv2 score-based generative models in TensorFlow/Keras: train, sample, "
                "evaluate, export for TF Serving, and run as a Kubeflow pipeline.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["ncsn_tf", "ncsn_tf.*", "pipelines", "pipelines.*"]),
    install_requires=[
        "keras>=3.15",
        "tensorflow-datasets",
        "absl-py",
        "tensorboard",
        "numpy",
        "scipy",
        "scikit-learn",
        "pyyaml",
        "importlib_resources",  # TFDS needs it to download datasets
    ],
    extras_require={
        # Exactly one TensorFlow distribution: pick `cpu` or `gpu`.
        "cpu": ["tensorflow-cpu>=2.21,<2.22"],
        "gpu": ["tensorflow[and-cuda]>=2.21,<2.22"],
        "torch": ["torch>=2.4"],  # only to read official .pth checkpoints
        "pipelines": ["kfp==2.17.0"],
        "test": ["pytest>=8", "pytest-timeout", "pytest-xdist", "ruff==0.17.6"],
    },
)
