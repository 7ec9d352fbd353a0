"""The README's Python snippets run as written: in order, as one script, in a fresh interpreter
(its HF section installs the transformers patch process-wide and its vocab-parallel section starts
a process group, neither of which may leak into the other tests)."""

import os
import re
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _snippets() -> list[str]:
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def test_readme_has_snippets():
    # Guards the extraction itself: a renamed fence would otherwise make the run below vacuous.
    assert len(_snippets()) >= 6


def test_readme_snippets_run(tmp_path):
    pytest.importorskip("transformers")
    script = "\n\n".join(_snippets())
    # Sanity of what the snippets compute, checked at the end of the same script: the first loss
    # is about log(V) for random heads scaled by H**-0.5, not an overflowed or nan value.
    script += textwrap.dedent("""

        import math
        assert torch.isfinite(loss).all(), loss
        first = fusedce.linear_cross_entropy(hidden, lm_head, labels)
        assert abs(first.item() - math.log(32000)) < 1.0, first
        print("README snippets OK")
    """)
    path = tmp_path / "readme_snippets.py"
    path.write_text(script)
    env = dict(os.environ, MASTER_PORT=str(29500 + os.getpid() % 1000), RANK="0", WORLD_SIZE="1")
    env.pop("FUSEDCE_PATCH_TRANSFORMERS", None)
    run = subprocess.run([sys.executable, str(path)], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "README snippets OK" in run.stdout
