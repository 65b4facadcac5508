"""The README's "From Python" example runs as written and prints what it says."""

import os
import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"


def readme_block(section: str, language: str) -> str:
    text = README.read_text()
    start = text.index(f"## {section}\n")
    end = text.find("\n## ", start + 1)
    blocks = re.findall(rf"```{language}\n(.*?)```", text[start:end], re.S)
    assert blocks, f"README's {section!r} section has no {language} block"
    return blocks[0]


def test_the_readme_python_example_runs_on_the_local_model(tmp_path):
    assert "RMBOOST_MODEL" in os.environ, (
        "RMBOOST_MODEL is not set: run the suite with `bash scripts/test.sh`, which installs "
        "the small model and names it"
    )
    install = readme_block("From Python", "sh")
    assert "pip install ./python" in install
    code = readme_block("From Python", "python")
    assert len(code.strip().splitlines()) <= 12, "the example stays about 10 lines"
    env = dict(os.environ, HF_DATASETS_CACHE=str(tmp_path / "hf"), HF_HUB_OFFLINE="1")
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
        env=env,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [line for line in out.stdout.splitlines() if line.strip()]
    assert len(rows) == 2, out.stdout
    for line in rows:
        assert re.match(r"^(better|worse) \| \S", line), line
