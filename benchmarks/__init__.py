"""Benchmarks of the ReplaceMe pipeline: speed against a PyTorch baseline, FLOP counts, memory."""
