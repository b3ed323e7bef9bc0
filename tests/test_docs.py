"""The documentation builds with Sphinx without a single warning.

The HTML goes to a temporary folder. The gallery is not executed here
(``plot_gallery=0``; tests/test_examples.py runs every example), but its pages
are generated and cross-referenced. Sphinx writes its generated sources
(``doc/generated/``, ``doc/auto_examples/``) next to ``doc/conf.py``, as
``make -C doc html`` does; both are git-ignored.
"""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC = os.path.join(ROOT, "doc")


def test_docs_build_without_warnings(tmp_path):
    # Only a missing Sphinx skips; the extensions doc/conf.py needs are in the
    # tests extra, so a missing one fails the build below.
    pytest.importorskip("sphinx")
    command = [
        sys.executable, "-m", "sphinx",
        "-b", "html",
        "-W", "--keep-going",  # every warning is an error, and all are listed
        "-q",
        "-E",  # read every source again: warnings of unchanged pages are reported too
        "-D", "plot_gallery=0",
        "-d", str(tmp_path / "doctrees"),
        DOC, str(tmp_path / "html"),
    ]
    env = {**os.environ, "MPLBACKEND": "Agg"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"sphinx-build failed:\n{output}"
    assert "WARNING" not in output, output
    assert (tmp_path / "html" / "index.html").is_file()
    assert (tmp_path / "html" / "auto_examples" / "index.html").is_file()
