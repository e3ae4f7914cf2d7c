"""Routing test cases shared by the CPU tests and the CUDA tests (tests/gpu)."""
import itertools

import torch

FLOATS = [torch.float32, torch.bfloat16, torch.float16]


def route_cases():
    """A sample of the (T, E, k, dtype) cross product that still covers every value."""
    Ts = [1, 7, 128, 8192]
    Es = [1, 3, 8, 60, 64, 256, 1024]
    ks = [1, 2, 6, 8]
    cases = []
    for i, (E, k) in enumerate(itertools.product(Es, ks)):
        if k > E:
            continue
        T = Ts[i % len(Ts)]
        if T * E > 8192 * 256:  # keep the reference's Python loops quick
            T = 512
        cases.append((T, E, k, FLOATS[i % 3]))
    return cases


def assert_route_equal(out, exp):
    """ids, slots and counts exactly; weights to float rounding (on any device)."""
    for name, a, b in zip(("weights", "ids", "slots", "counts"), out, exp):
        a, b = a.cpu(), b.cpu()
        if name == "weights":
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
        else:
            assert torch.equal(a, b), f"{name} differ:\n{a}\n{b}"
