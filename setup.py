"""Builds glcic_fast and its C++ extension glcic_fast._C.

The extension always gets its CPU sources (csrc/*.cpp, csrc/ops/*.cpp, csrc/ops/cpu/*.cpp).
Its CUDA sources (csrc/ops/cuda/*.cu and *.cpp) are added when the installed torch is a
CUDA build and nvcc is found, unless GLCIC_FAST_NO_CUDA=1. On a machine without a GPU
the CUDA code is compiled for TORCH_CUDA_ARCH_LIST (default 9.0, Hopper) and only linked.
GLCIC_FAST_NO_EXTENSION=1 skips the extension: the package then runs on torch and Triton.
"""

import glob
import os
import site
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _cuda_include_dirs():
    # CUDA 13 wheels put the toolkit headers ATen/cuda needs under nvidia/cu13/include.
    dirs = []
    for base in site.getsitepackages() + [site.getusersitepackages()]:
        for sub in ("nvidia/cu13/include", "nvidia/cuda_runtime/include"):
            path = os.path.join(base, sub)
            if os.path.isdir(path):
                dirs.append(path)
    return dirs


def _extensions():
    if _flag("GLCIC_FAST_NO_EXTENSION"):
        return [], {}
    import torch
    from torch.utils import cpp_extension

    rel = lambda paths: sorted(os.path.relpath(p, ROOT) for p in paths)
    cpu_sources = rel(glob.glob(os.path.join(ROOT, "csrc", "*.cpp"))
                      + glob.glob(os.path.join(ROOT, "csrc", "ops", "*.cpp"))
                      + glob.glob(os.path.join(ROOT, "csrc", "ops", "cpu", "*.cpp")))
    cuda_sources = rel(glob.glob(os.path.join(ROOT, "csrc", "ops", "cuda", "*.cu"))
                       + glob.glob(os.path.join(ROOT, "csrc", "ops", "cuda", "*.cpp")))
    if not cpu_sources:
        return [], {}

    with_cuda = (torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
                 and not _flag("GLCIC_FAST_NO_CUDA") and bool(cuda_sources))
    # -fopenmp: at::parallel_for is a header template that threads through OpenMP pragmas,
    # which compile to one thread without it (libgomp is torch's own at run time: same soname).
    cxx_flags = ["-O3", "-std=c++20", "-fopenmp"]
    link_flags = ["-fopenmp"]
    define_macros = [("TORCH_EXTENSION_NAME", "_C")]
    if with_cuda:
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0"
        ext = cpp_extension.CUDAExtension(
            "glcic_fast._C",
            cpu_sources + cuda_sources,
            include_dirs=[os.path.join(ROOT, "csrc")] + _cuda_include_dirs(),
            define_macros=define_macros + [("WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-std=c++20"]},
            extra_link_args=link_flags,
        )
    else:
        ext = cpp_extension.CppExtension(
            "glcic_fast._C",
            cpu_sources,
            include_dirs=[os.path.join(ROOT, "csrc")],
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=link_flags,
        )
    print(f"glcic_fast: building _C with{'' if with_cuda else 'out'} CUDA sources", file=sys.stderr)
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    packages=["glcic_fast", "glcic_fast.nn", "glcic_fast.ops", "glcic_fast.inference", "glcic_fast.training",
              "glcic_fast.cli", "glcic_fast.serving", "glcic_fast.kernels"],
    package_dir={"glcic_fast": "glcic_fast", "glcic_fast.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
