"""Build script: the Python package, the Triton kernels (kernels/ installed as fastvae.kernels), the
C++/CUDA sources (csrc/ shipped as fastvae/csrc, for the JIT fallback) and, when torch is
importable at build time, the C++ extension fastvae._C (CPU kernels; the CUDA kernels too when
torch is a CUDA build and nvcc is found through CUDA_HOME).

Without torch at build time (or with FASTVAE_BUILD_EXT=0) the install is pure Python and
fastvae JIT-builds the extension on first use, if it can (see fastvae/_extension.py).
"""
import os
import runpy
import sys

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC_FILES = ["**/*.cpp", "**/*.cu", "**/*.h", "**/*.cuh"]


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
    headers = [os.path.relpath(os.path.join(d, f), HERE) for d, _, files in os.walk(build["CSRC"]) for f in files if f.endswith((".h", ".cuh"))]
    objects = os.path.join(HERE, "build", f"temp-{sys.implementation.cache_tag}-torch{torch.__version__}{'-cuda' if cuda else ''}")

    class BuildExtension(cpp_extension.BuildExtension):
        """torch's ninja build with its objects kept in build/temp-<python>-torch<version>: pip's editable
        installs otherwise compile in a fresh temporary folder each time, so a second
        `pip install -e` recompiled everything; now ninja recompiles only what changed, then relinks."""

        def finalize_options(self) -> None:
            super().finalize_options()
            self.build_temp = objects

        def build_extensions(self) -> None:
            print(f"fastvae: building the C++{'/CUDA' if cuda else ''} extension fastvae._C from {len(sources)} files in csrc/ "
                  f"with ninja (a cold build takes 1.5-3 min on 2 cores; objects are kept in {os.path.relpath(objects, HERE)}/, "
                  "so a rebuild recompiles only what changed)", flush=True)
            super().build_extensions()

    return {
        "ext_modules": [kind("fastvae._C", sources, depends=headers, extra_compile_args=flags if cuda else flags["cxx"])],
        "cmdclass": {"build_ext": BuildExtension},
    }


setup(
    packages=find_packages(include=["fastvae", "fastvae.*"]) + ["fastvae.kernels", "fastvae.csrc"],
    package_dir={"fastvae.kernels": "kernels", "fastvae.csrc": "csrc"},
    package_data={"fastvae.csrc": CSRC_FILES},
    **extension_args(),
)
