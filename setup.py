"""m6jax: M6-family multimodal pretraining in JAX/Flax."""
import os

from setuptools import find_packages, setup

here = os.path.dirname(os.path.abspath(__file__))
with open(os.path.join(here, "requirements.txt"), encoding="utf-8") as f:
    install_requires = [l.strip() for l in f if l.strip() and not l.startswith("#")]

setup(
    name="m6jax",
    version="0.1.0",
    description="M6 / M6-T / M6-10T multimodal pretraining in JAX and Flax",
    long_description=open(os.path.join(here, "README.md"), encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["m6jax", "m6jax.*"]),
    install_requires=install_requires,
    extras_require={
        # jax[cuda12] pulls the jax-cuda12-plugin/pjrt of the same jax version.
        "cuda12": ["jax[cuda12]>=0.10.2,<0.11"],
        "tpu": ["jax[tpu]>=0.10.2,<0.11"],
        # `tensorboard --logdir DIR` (the runs write event files with tensorboardX).
        "tensorboard": ["tensorboard>=2.18,<3"],
        # pytest-xdist: the suite runs on two worker processes (pytest.ini).
        "dev": ["pytest>=8,<10", "pytest-xdist>=3.6,<4", "pyyaml>=6,<7", "nbclient>=0.10,<0.12", "nbformat>=5.10,<6",
                "jupytext>=1.19,<2",
                "ipykernel>=6.29,<8", "tensorboard>=2.18,<3"],
    },
)
