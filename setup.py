"""Builds robustdrop and its extension robustdrop._C.

The C++ CPU kernels are always built. The CUDA kernels are added when torch
was built with CUDA and nvcc is found, or when FORCE_CUDA=1. Install with
``pip install --no-build-isolation -e .`` so the extension compiles against
the torch already installed.
"""
import glob
import os
import shutil

from setuptools import find_packages, setup
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))


def cuda_wanted():
    if os.environ.get("FORCE_CUDA", "0") == "1":
        return True
    import torch

    nvcc = shutil.which("nvcc") or (cpp_extension.CUDA_HOME and os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc"))
    return torch.version.cuda is not None and bool(nvcc) and os.path.exists(nvcc)


def extension():
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/autograd/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    # at::parallel_for runs serially unless the extension itself is built with OpenMP. No -std: the
    # sources are C++17 and C++20, and cpp_extension adds the standard the installed torch's headers
    # are written for (C++17 to torch 2.11, C++20 since), which they warn about in every file otherwise.
    cxx_flags = ["-O3", "-fopenmp"]
    link_flags = ["-fopenmp"]
    if cuda_wanted():
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        nvcc_flags = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]
        return cpp_extension.CUDAExtension(
            "robustdrop._C", sources, extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
            extra_link_args=link_flags, define_macros=[("ROBUSTDROP_WITH_CUDA", "1")],
        )
    return cpp_extension.CppExtension("robustdrop._C", sources, extra_compile_args={"cxx": cxx_flags},
                                      extra_link_args=link_flags)


setup(
    name="robustdrop",
    version="0.1.0",
    description="Fused kernels for structured and guided dropout (DropBlock, CamDrop, FDD, Random Mask, EWS)",
    package_dir={"": "python"},
    packages=find_packages("python"),
    python_requires=">=3.10",
    install_requires=["torch>=2.6"],
    extras_require={"triton": ["triton>=3.0"], "test": ["pytest", "numpy"], "bench": ["matplotlib"]},
    ext_modules=[extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
    zip_safe=False,
)
