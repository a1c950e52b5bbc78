"""The README's Python API and CLI lines name things that exist."""

import re
import subprocess
import sys
from pathlib import Path

README = (Path(__file__).parent.parent / "README.md").read_text()


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README, re.S)


def test_every_import_in_the_readme_works():
    imports = [
        line for block in python_blocks() for line in block.splitlines() if line.startswith(("from ", "import "))
    ]
    assert len(imports) >= 8  # the Python API section and the task-switching example
    code = "\n".join(line.split("#")[0].rstrip() for line in imports)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_the_layout_section_lists_every_stage_package():
    layout = README[README.index("## Layout") :]
    root = Path(__file__).parent.parent / "lora_deploy"
    for package in sorted(p.name for p in root.iterdir() if (p / "__init__.py").is_file()):
        assert f"{package}/" in layout, package


def test_ci_runs_the_readme_test_command_verbatim():
    """.ci/run runs the command the README's Install section gives for the tests, as written."""
    ci = (Path(__file__).parent.parent / ".ci" / "run").read_text().splitlines()
    command = ci[ci.index("# --- README: test ---") + 1]
    install = README[README.index("## Install") : README.index("### By hand")]
    shown = [
        line.split("#")[0].strip()
        for block in re.findall(r"```bash\n(.*?)```", install, re.S)
        for line in block.splitlines()
    ]
    assert command in shown, (command, shown)
