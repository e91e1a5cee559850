"""The one wrapper around llama.cpp's official Hugging Face -> GGUF converter.

Why the official converter and not our own writer: the device runs llama.cpp, and the GGUFs it
loads in the wild were written by ``convert_hf_to_gguf.py``.  Exporting the embedded default with
the same script means the default is "just another model" and every name, permutation and
metadata key is what real users' files carry.

The script ships inside the llama-cpp-python sdist the Makefile downloads once
(``~/.cache/cdcca/sdist/llama_cpp_python-<ver>.tar.gz``).  We unpack only what the converter
needs (the script, ``conversion/``, ``gguf-py/``) once, atomically, and run it in a subprocess
with ``PYTHONPATH`` at the sdist's own ``gguf-py`` so its gguf matches its code.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

LLAMA_CPP_PYTHON_VERSION = "0.3.36"
OUTTYPES = ("f32", "f16", "bf16", "q8_0")
_NEEDED = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/")  # under vendor/llama.cpp/
_TIMEOUT_S = 900


class ConverterError(RuntimeError):
    """The converter is missing or refused a model; the message is one line."""


def sdist_cache() -> Path:
    """Where the Makefile puts the sdist (``CDCCA_SDIST_DIR`` overrides)."""
    env = os.environ.get("CDCCA_SDIST_DIR")
    return Path(env) if env else Path.home() / ".cache" / "cdcca" / "sdist"


def _tarball(cache: Path) -> Path:
    p = cache / f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}.tar.gz"
    if not p.is_file():
        raise ConverterError(f"llama.cpp converter not found: {p} is missing (run `make setup`, which downloads "
                             f"the llama-cpp-python {LLAMA_CPP_PYTHON_VERSION} sdist)")
    return p


def _wanted(name: str, prefix: str) -> str | None:
    """The member's path below vendor/llama.cpp/ if the converter needs it, else None."""
    if not name.startswith(prefix):
        return None
    rel = name[len(prefix):]
    if rel == _NEEDED[0] or any(rel.startswith(d) for d in _NEEDED[1:]):
        return rel
    return None


def _unpack(tar_path: Path, dest: Path) -> None:
    """Extract the converter's files into ``dest`` via a temp dir and one atomic rename, so two
    processes racing here (pytest -n 2) never see a half-written tree."""
    prefix = f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}/vendor/llama.cpp/"
    tmp = Path(tempfile.mkdtemp(prefix=dest.name + ".", dir=dest.parent))
    try:
        with tarfile.open(tar_path) as tf:
            members = []
            for m in tf.getmembers():
                rel = _wanted(m.name, prefix)
                if rel and (m.isfile() or m.isdir()):
                    m.name = rel
                    members.append(m)
            tf.extractall(tmp, members=members, filter="data")
        if not (tmp / _NEEDED[0]).is_file():
            raise ConverterError(f"{tar_path}: no vendor/llama.cpp/{_NEEDED[0]} inside")
        try:
            tmp.rename(dest)
        except OSError:
            if not (dest / _NEEDED[0]).is_file():  # lost the race to a complete tree: fine
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def converter_root() -> Path:
    """The unpacked ``vendor/llama.cpp`` tree holding ``convert_hf_to_gguf.py`` (unpacked on first use).
    ``CDCCA_LLAMA_CPP_DIR`` may point at an already unpacked tree instead."""
    env = os.environ.get("CDCCA_LLAMA_CPP_DIR")
    if env:
        root = Path(env)
        if not (root / _NEEDED[0]).is_file():
            raise ConverterError(f"CDCCA_LLAMA_CPP_DIR={root} has no {_NEEDED[0]}")
        return root
    cache = sdist_cache()
    dest = cache / f"llama.cpp-{LLAMA_CPP_PYTHON_VERSION}"
    if not (dest / _NEEDED[0]).is_file():
        _unpack(_tarball(cache), dest)
    return dest


def _last_error_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for ln in reversed(lines):
        if "error" in ln.lower() or "exception" in ln.lower() or "not supported" in ln.lower():
            return ln
    return lines[-1] if lines else "no output"


def convert(model_dir: str | Path, outfile: str | Path, outtype: str = "f32", *, mmproj: bool = False,
            timeout_s: float = _TIMEOUT_S) -> Path:
    """Run ``convert_hf_to_gguf.py MODEL_DIR --outfile OUTFILE --outtype T [--mmproj]``.

    Writes to a temp name beside ``outfile`` and renames on success, so a failed or killed
    conversion never leaves a truncated GGUF under the final name.  Returns ``outfile``.
    """
    model_dir, outfile = Path(model_dir).resolve(), Path(outfile).resolve()  # the script runs in its own cwd
    if outtype not in OUTTYPES:
        raise ConverterError(f"unsupported --outtype {outtype!r}; the converter writes {', '.join(OUTTYPES)} "
                             f"(other quant types: quantize its f32 output)")
    if not (model_dir / "config.json").is_file():
        raise ConverterError(f"{model_dir}: not a Hugging Face checkpoint (no config.json)")
    root = converter_root()
    outfile.parent.mkdir(parents=True, exist_ok=True)
    tmp = outfile.with_name(f".{outfile.name}.{os.getpid()}.part")
    cmd = [sys.executable, str(root / _NEEDED[0]), str(model_dir), "--outfile", str(tmp), "--outtype", outtype]
    if mmproj:
        cmd.append("--mmproj")
    env = {**os.environ, "PYTHONPATH": str(root / "gguf-py"), "HF_HUB_OFFLINE": "1"}
    try:
        r = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        tmp.unlink(missing_ok=True)
        raise ConverterError(f"convert_hf_to_gguf timed out after {timeout_s:.0f} s on {model_dir}") from None
    if r.returncode != 0 or not tmp.is_file():
        tmp.unlink(missing_ok=True)
        raise ConverterError(f"convert_hf_to_gguf failed on {model_dir}"
                             f"{' (--mmproj)' if mmproj else ''}: {_last_error_line(r.stderr + r.stdout)}")
    tmp.replace(outfile)
    return outfile


def convert_pair(model_dir: str | Path, out_dir: str | Path, outtype: str = "f32", *, stem: str = "model") -> tuple[Path, Path]:
    """Text GGUF and mmproj of a vision-language checkpoint: ``{stem}-{outtype}.gguf`` and
    ``mmproj-{stem}-{outtype}.gguf`` in ``out_dir``."""
    out_dir = Path(out_dir)
    text = convert(model_dir, out_dir / f"{stem}-{outtype}.gguf", outtype)
    proj = convert(model_dir, out_dir / f"mmproj-{stem}-{outtype}.gguf", outtype, mmproj=True)
    return text, proj
