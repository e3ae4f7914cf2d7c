"""Microbenchmarks: every op against the PyTorch composite an engine would write instead."""
