"""Measuring runs and models: the scaling law, sweeps, memory plans and benchmarks."""
