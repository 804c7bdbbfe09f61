"""The README's first command works as written and labels every one of its boxes."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_readme_first_command_labels_its_boxes(data_dir, tmp_path):
    block = re.search(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), re.S).group(1)
    first = block.splitlines()[0]
    assert first.startswith('pip install -e ".[test]" && ovsam label ')
    args = shlex.split(first.split(" && ", 1)[1])[2:]  # after `ovsam label`
    args[args.index("--out") + 1] = str(tmp_path / "labeled.json")
    code = "import sys; from ovsam_cli.main import run; sys.argv = ['ovsam', 'label'] + sys.argv[1:]; run()"
    p = subprocess.run([sys.executable, "-c", code, *args, "--workers", "0"], cwd=REPO, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr
    boxes = json.loads((REPO / args[args.index("--boxes") + 1]).read_text())
    assert len(json.loads((tmp_path / "labeled.json").read_text())) == len(boxes) == 19
    assert "skipped" not in p.stderr and f"{len(boxes)} prompts → {len(boxes)} records" in p.stderr
