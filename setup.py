"""Build script: the Python package, the Triton kernels (kernels/ installed as fastvae.kernels)."""
from setuptools import setup

setup(
    packages=["fastvae", "fastvae.ops", "fastvae.kernels"],
    package_dir={"fastvae.kernels": "kernels"},
)
