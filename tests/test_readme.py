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


def test_train_on_your_own_data_example_runs(tmp_path):
    """The section's commands, with the step counts cut down, on rows written where the example expects them."""
    from test_train_cli import _write_jsonl

    _saved(tmp_path / "demo_out")
    (tmp_path / "rows.jsonl").write_text(_write_jsonl(tmp_path / "data", count=6).read_text())
    (tmp_path / "images").symlink_to(tmp_path / "data" / "images")
    (tmp_path / "held_out.jsonl").write_text((tmp_path / "rows.jsonl").read_text())
    section = README.read_text().split("\n## Train on your own data\n", 1)[1].split("\n## ", 1)[0]
    script = re.findall(r"```bash\n(.*?)```", section, flags=re.S)[0]
    for long, short in (("--max_steps 1500", "--max_steps 4"), ("--eval_steps 500", "--eval_steps 2"),
                        ("--save_steps 500", "--save_steps 2"), ("--per_device_train_batch_size 8", "--per_device_train_batch_size 2"),
                        ("--warmup_steps 100", "--warmup_steps 0")):  # fmt: skip
        assert long in script
        script = script.replace(long, short)
    env = subprocess_env(HF_MODULES_CACHE=str(tmp_path / "modules"))
    completed = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "--gradient_accumulation_steps" in completed.stdout  # the --help line
    card = (tmp_path / "finetuned" / "final" / "README.md").read_text()
    assert "REC Acc@0.5" in card and (tmp_path / "finetuned" / "checkpoint-4").is_dir()
