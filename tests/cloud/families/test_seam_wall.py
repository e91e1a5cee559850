"""The seam's wall: no module outside cloud/families/ imports a concrete transformers model class
(Auto classes are fine -- they pick the class from a checkpoint's config)."""
from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
CONCRETE = re.compile(r"^(?!Auto)[A-Z]\w*(For[A-Z]\w*|Model|Config|PreTrainedModel)$")


def _imports(path: Path):
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "transformers":
            for a in node.names:
                yield node.module, a.name


def test_only_the_family_seam_imports_concrete_model_classes():
    bad = []
    for top in ("cloud", "device", "bench", "cdcca_cli", "tui"):
        for p in (ROOT / top).rglob("*.py"):
            if "families" in p.relative_to(ROOT).parts:
                continue
            bad += [f"{p.relative_to(ROOT)}: {m}.{n}" for m, n in _imports(p)
                    if CONCRETE.match(n) or ".models." in m]
    assert not bad, bad


def test_the_wall_sees_a_concrete_import():
    assert CONCRETE.match("Idefics3ForConditionalGeneration") and CONCRETE.match("LlamaConfig")
    assert not CONCRETE.match("AutoModelForCausalLM") and not CONCRETE.match("AutoConfig")
