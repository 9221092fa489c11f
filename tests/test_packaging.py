"""The checkout never shadows installed packages: the top-level `kernels/` folder is
`redknot_rag.kernels`, never the module `kernels` (Hugging Face's package, which transformers imports).

Each check runs a fresh interpreter in the repository root, where `python3 -c` and `python3 -m pytest`
put the root first on sys.path, exactly as the README's commands do.
"""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run_in_root(code: str, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *flags, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)


def _hf_kernels_installed() -> bool:
    try:
        importlib.metadata.version("kernels")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def test_transformers_imports_from_the_repo_root():
    proc = _run_in_root(
        "import transformers.models.llama.configuration_llama, kernels; print(getattr(kernels, '__file__', None))"
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    found = proc.stdout.strip().splitlines()[-1]
    assert not found.startswith(str(ROOT / "kernels")), f"`import kernels` in the repo root found {found}"


@pytest.mark.skipif(not _hf_kernels_installed(), reason="Hugging Face's `kernels` package is not installed")
def test_import_kernels_in_the_repo_root_is_hugging_faces_package():
    proc = _run_in_root("import kernels; print(kernels.__file__); print(hasattr(kernels, 'CUDAProperties'))")
    assert proc.returncode == 0, proc.stderr[-2000:]
    file, has_api = proc.stdout.split()
    assert not file.startswith(str(ROOT / "kernels")) and has_api == "True"


def test_without_the_package_kernels_reads_as_not_installed():
    # -S: no site-packages, so nothing else provides `kernels`; the folder must then look like the
    # empty namespace transformers treats as "not installed" (no __file__, nothing inside).
    proc = _run_in_root("import kernels; print(getattr(kernels, '__file__', None), list(kernels.__path__))", "-S")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "None []"


def test_redknot_rag_kernels_is_the_folder():
    proc = _run_in_root(
        "import redknot_rag.kernels as k, redknot_rag.retrieval as r; print(k.__file__); print(r.__file__)"
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    kernels_file, retrieval_file = proc.stdout.split()
    assert Path(kernels_file) == ROOT / "kernels" / "__init__.py"
    assert Path(retrieval_file) == ROOT / "retrieval" / "__init__.py"
