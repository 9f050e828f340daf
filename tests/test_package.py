"""Packaging: the import-time check for unbuilt kernels, and the build metadata."""
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_unbuilt_kernels_say_how_to_build(tmp_path):
    # A copy of the package without its compiled modules, first on the path.
    shutil.copytree(ROOT / "dbmpi", tmp_path / "dbmpi",
                    ignore=shutil.ignore_patterns("*.so", "*.pyd", "__pycache__"))
    # An editable install's import hook (setuptools' __editable__ finder) would still find
    # the checkout's compiled modules; without it, this is an installation never built.
    code = ("import sys; sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in "
            "(getattr(f, '__module__', '') + repr(f)).lower()]; import dbmpi")
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "compiled kernels (dbmpi._kernels.*) are not built" in result.stderr
    assert "pip install -e ." in result.stderr


def test_every_pyx_is_an_extension_the_package_imports():
    import dbmpi._kernels as built

    sources = sorted(p.stem for p in (ROOT / "cython_kernels").glob("*.pyx"))
    assert sources == ["dense", "lcn", "local", "optim", "outputs", "pooling"]
    compiled = {p.name.split(".")[0] for p in Path(built.__file__).parent.iterdir() if p.suffix in (".so", ".pyd")}
    assert set(sources) <= compiled
    kernels_py = (ROOT / "dbmpi" / "kernels.py").read_text()
    for stem in sources:
        assert f"dbmpi._kernels.{stem} import" in kernels_py


def test_version_is_defined_once():
    """pyproject.toml reads the version from dbmpi.__version__ (statically, without importing
    the kernels); the installed metadata agrees with it."""
    import importlib.metadata

    try:
        import tomllib
    except ModuleNotFoundError:  # Python < 3.11
        import tomli as tomllib

    import dbmpi

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in project["project"]
    assert "version" in project["project"]["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "dbmpi.__version__"}
    assert importlib.metadata.version("dbmpi") == dbmpi.__version__


def test_license_is_bsd_3_clause():
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("BSD 3-Clause License")
    assert "Copyright (c) 2026, the dbmpi developers" in text
    assert "BSD-3-Clause" in (ROOT / "pyproject.toml").read_text()
