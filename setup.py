"""setuptools hook. Pure-Python install by default; CUDA kernels in csrc/ are JIT-built on first use on a CUDA
machine. Set VEXPERT_BUILD_CUDA=1 to build them ahead of time (needs a CUDA torch and nvcc)."""
from setuptools import setup

setup()
