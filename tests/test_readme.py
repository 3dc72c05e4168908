"""The documented Python example runs as written, every config key is documented, and the README stays
short with every relative link in it and in docs/ pointing at a file that exists."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

from rdprune.config import config_reference

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
API = ROOT / "docs" / "api.md"
CONFIG = ROOT / "docs" / "config.md"


@pytest.mark.slow
def test_python_api_example_runs_as_written(tmp_path):
    section = API.read_text().split("# Python API", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    # The target is met, and only just: the allocation keeps every weight the budget allows, up to
    # one level step of one layer. (The last digit moves between machines with the default threads:
    # near-tied curves can pick a neighbouring level.)
    overall = float(re.search(r"overall (\d+\.\d)%", proc.stdout).group(1))
    assert 70.0 <= overall <= 70.5, proc.stdout
    assert (tmp_path / "resnet18_pruned.pt").exists()


def test_config_reference_in_docs_is_current():
    assert config_reference().strip() in CONFIG.read_text()


def test_readme_is_short_and_relative_links_resolve():
    assert len(README.read_text().splitlines()) <= 250
    broken = []
    for page in [README, *sorted((ROOT / "docs").glob("*.md"))]:
        # Links outside code: inline [text](target) and images ![alt](target).
        text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            path = target.split("#", 1)[0]
            if not path or re.match(r"[a-z][a-z0-9+.-]*:", path):  # same-page anchor, or a URL
                continue
            if not (page.parent / path).exists():
                broken.append(f"{page.relative_to(ROOT)}: {target}")
    assert not broken, broken
