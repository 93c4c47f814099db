"""The README's user examples run as written, against a tiny model folder saved where they expect the demo's."""

import re
import subprocess
import sys
from pathlib import Path

from conftest import subprocess_env
from PIL import Image
from test_pipeline import _saved


README = Path(__file__).resolve().parents[1] / "README.md"


def _section_code(title: str) -> str:
    """Every ```python block of the README section `## {title}`, in order, as one script."""
    section = README.read_text().split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]
    return "\n".join(re.findall(r"```python\n(.*?)```", section, flags=re.S))


def test_quick_start_examples_run(tmp_path):
    _saved(tmp_path / "demo_out")  # demo_out/model: model, processor and pipeline code, `<vis>` likely
    Image.new("RGB", (40, 24), (90, 30, 200)).save(tmp_path / "scene.png")
    code = _section_code("Quick start")
    assert "ObjectStreamer" in code and 'pipeline("visual-grounding"' in code
    env = subprocess_env(HF_MODULES_CACHE=str(tmp_path / "modules"))
    completed = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert (tmp_path / "grounded.png").is_file()
    assert completed.stdout.count("object ") >= 1 and completed.stdout.count("streamed ") >= 1
