"""python -m vexpert_kernels.bench report [--results DIR] [--readme PATH] [--compile-report [JSON]]"""
import sys

from .report import main

if __name__ == "__main__":
    sys.exit(main())
