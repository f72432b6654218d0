"""Functional ops (kernels -> launcher -> autograd -> torch.library registration), one file per op."""
