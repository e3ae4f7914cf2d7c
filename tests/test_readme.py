"""The README's Python examples run as written (those meant for torchrun are skipped here and
covered by the distributed tests)."""
import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
LOCAL = [b for b in BLOCKS if not b.lstrip().startswith("# torchrun")]


@pytest.mark.parametrize("i", range(len(LOCAL)))
def test_readme_example_runs(i):
    exec(compile(LOCAL[i], f"README block {i}", "exec"), {})


def test_readme_has_the_two_commands():
    text = README.read_text()
    assert "bash scripts/demo.sh" in text and "bash scripts/test.sh" in text
    ci = (README.parent / ".ci" / "run").read_text()
    assert "bash scripts/test.sh" in ci
