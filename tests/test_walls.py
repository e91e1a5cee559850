"""The house walls (shared/DESIGN.md), enforced."""
import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _modules(pkg: str) -> list[str]:
    return [".".join(p.relative_to(ROOT).with_suffix("").parts) for p in sorted((ROOT / pkg).rglob("*.py"))
            if p.name != "__init__.py"]


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    out = set()
    for n in ast.walk(tree):
        if isinstance(n, ast.Import):
            out |= {a.name.split(".")[0] for a in n.names}
        elif isinstance(n, ast.ImportFrom) and n.module and n.level == 0:
            out.add(n.module.split(".")[0])
    return out


def test_device_and_chat_import_without_torch():
    """Every device module and the chat/sync/queue CLI import with torch & co. made unimportable."""
    mods = _modules("device") + ["cdcca_cli.main", "cdcca_cli.device_cmds", "cdcca_cli.sync_cmd"]
    code = ("import sys\nfor m in ('torch', 'transformers', 'peft', 'accelerate'): sys.modules[m] = None\n"
            f"import importlib\nfor m in {mods!r}: importlib.import_module(m)\n"
            "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'peft', 'cloud') and sys.modules[m] is not None]\n"
            "assert not bad, bad\nprint('ok')")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-2000:]


def test_device_never_imports_cloud_or_faces():
    for p in (ROOT / "device").rglob("*.py"):
        bad = _imports(p) & {"cloud", "cdcca_cli", "tui", "torch", "transformers", "peft"}
        assert not bad, f"{p}: imports {bad}"


def test_cloud_never_imports_faces():
    for p in (ROOT / "cloud").rglob("*.py"):
        bad = _imports(p) & {"cdcca_cli", "tui"}
        assert not bad, f"{p}: imports {bad}"


def test_test_files_have_unique_basenames():
    """pytest (rootdir import mode) cannot collect two test modules with one basename; a mirrored
    tree makes that easy to do by accident (tests/cloud/test_x.py beside tests/device/test_x.py)."""
    from collections import Counter
    from pathlib import Path

    names = Counter(p.name for p in Path(__file__).parent.rglob("test_*.py"))
    assert not [n for n, c in names.items() if c > 1], "rename one of each pair"
