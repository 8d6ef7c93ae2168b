"""moebench: a benchmark and contest harness for Mixture-of-Experts inference kernels."""

__version__ = "0.1.0"
