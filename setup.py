"""Build script: the Python package, the Triton kernels (kernels/ installed as fastvae.kernels) and,
when torch is importable at build time, the C++ extension fastvae._C (CPU kernels; the CUDA
kernels too when torch is a CUDA build and nvcc is found through CUDA_HOME).

Without torch at build time (or with FASTVAE_BUILD_EXT=0) the install is pure Python and
fastvae JIT-builds the extension on first use, if it can (see fastvae/_extension.py).
"""
import os
import runpy

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def extension_args() -> dict:
    if os.environ.get("FASTVAE_BUILD_EXT", "1") == "0":
        return {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        return {}
    build = runpy.run_path(os.path.join(HERE, "fastvae", "_build.py"))
    cuda = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    kind = cpp_extension.CUDAExtension if cuda else cpp_extension.CppExtension
    flags = {"cxx": build["CXX_FLAGS"] + build["defines"](cuda), "nvcc": build["NVCC_FLAGS"] + build["defines"](cuda)}
    sources = [os.path.relpath(path, HERE) for path in build["sources"](cuda)]
    return {
        "ext_modules": [kind("fastvae._C", sources, extra_compile_args=flags if cuda else flags["cxx"])],
        "cmdclass": {"build_ext": cpp_extension.BuildExtension},
    }


setup(
    packages=["fastvae", "fastvae.ops", "fastvae.kernels"],
    package_dir={"fastvae.kernels": "kernels"},
    **extension_args(),
)
