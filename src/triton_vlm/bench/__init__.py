"""Benchmarks: full-size architectures with random weights, workloads, and reports."""
