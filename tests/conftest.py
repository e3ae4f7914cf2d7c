# Makes the shared test helpers in tests/ (routing_cases, dist_utils) importable from tests/gpu.
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
