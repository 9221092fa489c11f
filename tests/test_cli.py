"""The command line as a new user meets it (issue 28): help that tells each default once and the file
types ingest reads; ingest that says what it skips, and why, before the model loads."""

from __future__ import annotations

import re
import subprocess
import sys
import time

import pytest


def _help(*cmd: str) -> str:
    r = subprocess.run([sys.executable, "-m", "redknot_rag.cli", *cmd, "--help"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return r.stdout


@pytest.mark.parametrize("cmd", ["serve", "ingest", "query", "generate"])
def test_help_tells_each_default_once(cmd):
    text = _help(cmd)
    options = re.split(r"\n  (?=-)", text.split("options:", 1)[1])
    for opt in options:
        flat = " ".join(opt.split())
        assert flat.count("(default:") <= 1 and "(default: None)" not in flat, flat


def test_ingest_help_lists_every_file_type_it_reads():
    from redknot_rag.retrieval.parser import SUPPORTED_SUFFIXES

    flat = " ".join(_help("ingest").split())
    assert all(s in flat for s in SUPPORTED_SUFFIXES), flat


def test_ingest_says_what_it_skips_before_loading_the_model(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "copyright").write_text("Format: machine-readable\n")
    (tmp_path / "docs" / "spec.rst").write_text("Title\n=====\n")
    t0 = time.perf_counter()
    r = subprocess.run(
        [sys.executable, "-m", "redknot_rag.cli", "ingest", str(tmp_path / "docs"), "--data-dir", str(tmp_path / "d")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 2, r.stderr
    assert f"skipped {tmp_path / 'docs' / 'copyright'}: no file extension" in r.stderr
    assert f"skipped {tmp_path / 'docs' / 'spec.rst'}: unsupported file type '.rst'" in r.stderr
    assert "nothing to ingest" in r.stderr and "loading the model" not in r.stderr
    assert not (tmp_path / "d").exists() and time.perf_counter() - t0 < 60
