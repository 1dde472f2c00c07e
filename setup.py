import pathlib
import re

from setuptools import find_packages, setup

HERE = pathlib.Path(__file__).parent
VERSION = re.search(r'__version__ = "([^"]+)"', (HERE / "byol_jax/__init__.py").read_text()).group(1)
REQUIREMENTS = [line.strip() for line in (HERE / "requirements.txt").read_text().splitlines()
                if line.strip() and not line.startswith("#")]

setup(
    name="byol_jax",
    version=VERSION,
    description="BYOL (Bootstrap Your Own Latent) self-supervised pretraining in JAX and Haiku",
    long_description=(HERE / "README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["byol_jax", "byol_jax.*"]),
    package_data={"byol_jax": ["assets/*"]},
    install_requires=REQUIREMENTS,
    extras_require={
        "cuda12": ["jax[cuda12]>=0.10.0,<0.12"],
        "cuda13": ["jax[cuda13]>=0.10.0,<0.12"],
        "tpu": ["jax[tpu]>=0.10.0,<0.12"],
        "torch": ["torch>=2.1"],
        "dev": ["pytest>=8.0", "torch==2.13.0"],
    },
    entry_points={"console_scripts": ["byol-jax=byol_jax.main:main"]},
)
