"""Builds svdkern._C (csrc/) with torch's BuildExtension; metadata lives in pyproject.toml."""

from pathlib import Path

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

sources = sorted(str(p) for p in Path("csrc").rglob("*.cpp"))

setup(
    ext_modules=[
        CppExtension(
            "svdkern._C",
            sources,
            include_dirs=[str(Path("csrc").resolve())],
            extra_compile_args={"cxx": ["-O2", "-std=c++17"]},
        )
    ],
    cmdclass={"build_ext": BuildExtension},
)
