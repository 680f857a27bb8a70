"""alignjax: a JAX-native research codebase for aligning language models with rewards."""

from setuptools import find_packages, setup

setup(
    name="alignjax",
    version="0.1.0",
    description="JAX-native reward modelling, preference optimisation and RL for language models.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["alignjax", "alignjax.*"]),
    install_requires=[
        "jax>=0.10.2,<0.11",
        "flax>=0.12.8,<0.13",
        "optax>=0.2.8,<0.3",
        "orbax-checkpoint>=0.12.8,<0.13",
        "grain>=0.2.18,<0.3",
        "chex>=0.1.92,<0.2",
        "ml-collections>=1.1.0,<2",
        "absl-py>=2.5.1,<3",
        "numpy>=1.26",
        "tokenizers>=0.21,<1",
        "safetensors>=0.4",
        "jinja2>=3.1",
        "pyarrow>=15",
        "tensorboardX>=2.6",
        "tqdm>=4.66",
        "matplotlib>=3.8",
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-xdist>=3.5"],
    },
    entry_points={"console_scripts": ["alignjax=alignjax.main:run"]},
)
