"""Compiled kernels: C++ for the CPU (cpu.py), built on the machine that runs them."""
