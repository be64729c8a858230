"""``qgait patch`` on a fake checkout (runs everywhere) and on a copy of a real one (OPENGAIT_ROOT)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from qgait_plugin.opengait.patching import PatchError, apply, load_patches, revert, status

FAKE_MAIN = (
    '"""A script."""\r\n'
    "import os\r\n"
    "import sys\r\n"
    "from pkg import thing  # comment\r\n"
    "\r\n"
    "X = 1\r\n"
    "import late\r\n"
)


def _fake(tmp_path: Path, text: str = FAKE_MAIN) -> Path:
    (tmp_path / "opengait").mkdir()
    (tmp_path / "opengait" / "main.py").write_bytes(text.encode())
    return tmp_path


def test_apply_inserts_one_line_after_leading_imports_and_is_idempotent(tmp_path):
    root = _fake(tmp_path)
    (patch,) = load_patches()
    assert "not applied" in status(root)[0]
    apply(root)
    once = (root / "opengait" / "main.py").read_bytes()
    apply(root)
    assert (root / "opengait" / "main.py").read_bytes() == once
    lines = once.decode().split("\r\n")
    assert lines[4] == patch.insert and lines[3].startswith("from pkg") and lines[7] == "import late"
    assert once.count(b"\r\n") == FAKE_MAIN.count("\r\n") + 1  # kept the file's CRLF endings
    assert status(root)[0].split(":")[1].strip().startswith("applied")


def test_revert_restores_bytes(tmp_path):
    root = _fake(tmp_path)
    apply(root)
    assert "reverted" in revert(root)[0]
    assert (root / "opengait" / "main.py").read_bytes() == FAKE_MAIN.encode()
    assert "not applied" in revert(root)[0]


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(PatchError, match="does not exist"):
        apply(tmp_path)
    root = _fake(tmp_path, "x = 1\n")
    with pytest.raises(PatchError, match="no top-level import"):
        apply(root)


@pytest.mark.opengait
@pytest.mark.skipif(not os.environ.get("OPENGAIT_ROOT"), reason="needs an OpenGait checkout in OPENGAIT_ROOT")
def test_patched_real_main_registers_the_plugin(tmp_path):
    src = Path(os.environ["OPENGAIT_ROOT"])
    root = tmp_path / "og"
    shutil.copytree(src / "opengait", root / "opengait")
    orig = (root / "opengait" / "main.py").read_bytes()
    apply(root)
    # run the patched script's imports (its argv parsing included) without its __main__ block
    code = ("import runpy, sys; sys.argv=['main.py']; runpy.run_path('main.py', run_name='not_main'); "
            "import modeling.models as m, modeling.losses as l; "
            "print(m.Baseline._qgait_original.__name__, hasattr(l, 'QGaitIDDLoss'))")
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    out = subprocess.run([sys.executable, "-c", code], cwd=root / "opengait", env=env, capture_output=True,
                         text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Baseline True" in out.stdout
    revert(root)
    assert (root / "opengait" / "main.py").read_bytes() == orig
