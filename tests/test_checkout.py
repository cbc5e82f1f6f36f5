"""The checkout itself: it imports as installed, and a green test run leaves no temporary folders."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_source_tree_holds_fasteval_kernels():
    """``python -m fasteval`` from the checkout root imports the source tree's ``fasteval/`` (the current
    folder comes first on sys.path), installed or not: its ``kernels`` must be there, and be the top-level
    ``kernels/`` that an install maps to ``fasteval.kernels``."""
    for name in ("__init__.py", "accumulator.py", "fused_metrics.py"):
        assert os.path.samefile(ROOT / "fasteval" / "kernels" / name, ROOT / "kernels" / name)


def test_python_dash_m_fasteval_from_the_checkout_root_finds_its_kernels():
    """From the checkout root the source tree is imported before any install (an editable install's finder
    would otherwise supply ``fasteval.kernels`` and hide a tree without it)."""
    code = "import fasteval.kernels.fused_metrics as m, fasteval; print(m.__file__); print(fasteval.__file__)"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSAFEPATH")})
    assert proc.returncode == 0, proc.stderr
    kernel, package = proc.stdout.split()
    assert Path(package) == ROOT / "fasteval" / "__init__.py"
    assert Path(kernel) == ROOT / "fasteval" / "kernels" / "fused_metrics.py"
    proc = subprocess.run([sys.executable, "-m", "fasteval", "--help"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and "bench" in proc.stdout, proc.stderr


def test_a_green_run_leaves_no_temporary_folders(tmp_path):
    """pytest keeps its temporary folders (here: datasets, compile caches) for three runs by default; the
    project's settings remove them after a green run, so repeated runs stay small on a shared disk."""
    (tmp_path / "test_big.py").write_text(textwrap.dedent("""
        def test_writes(tmp_path_factory, tmp_path):
            (tmp_path_factory.mktemp("data") / "big").write_bytes(b"x" * 2**20)
            (tmp_path / "also").write_bytes(b"x" * 2**20)
    """))
    temp = tmp_path / "tmp"
    temp.mkdir()
    env = {**os.environ, "TMPDIR": str(temp)}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-c", str(ROOT / "pyproject.toml"),
           "--rootdir", str(tmp_path), str(tmp_path / "test_big.py")]
    for _ in range(2):
        proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    kept = sum(f.stat().st_size for f in temp.rglob("*") if f.is_file())
    assert kept == 0, sorted(str(p) for p in temp.rglob("*"))


def readme_commands() -> list[str]:
    """The commands of the README's first code block, without their comments."""
    text = (ROOT / "README.md").read_text()
    block = text.split("```bash\n", 1)[1].split("```", 1)[0]
    return [line.split("#", 1)[0].strip() for line in block.splitlines() if line.split("#", 1)[0].strip()]


def test_ci_runs_the_readme_commands_as_written():
    """CI runs the README's two commands, the first (non-editable) before the second, both from the checkout
    root: what a new user types is what CI checks."""
    commands = readme_commands()
    assert len(commands) == 2 and commands[0].startswith("pip install . ") and "pytest" in commands[1]
    script = (ROOT / ".ci" / "run").read_text().splitlines()
    positions = [script.index(command) for command in commands]  # each on a line of its own
    assert positions == sorted(positions)
    assert 'cd "$(dirname "$0")/.."' in script[:positions[0]]
