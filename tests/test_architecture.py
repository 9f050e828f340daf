"""The package's layering, enforced so it cannot rot (see docs/DESIGN.md, "Package map").

(a) The MPI-free modules import without importing mpi4py at all: they run in `dbmpi plan`,
    `dbmpi data`, `dbmpi inspect`, on login nodes and in the serial tests.
(b) Only the MPI layer (the runtime, the parameter server, a model partition and the command
    line) may import mpi4py, even lazily inside a function: the algorithm orchestrators
    (downpour, sandblaster, run) reach MPI only through runtime/ and ps/.
(c) No module imports a private name (`_x`) from another dbmpi module; a private module
    (`dbmpi._kernels`) is imported only by the module that wraps it.
(d) No function in dbmpi/ is longer than MAX_FUNCTION_LINES (argparse parser builders
    excepted): a longer one is a sign that it holds more than one idea.

"""
import ast
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import dbmpi.data
import dbmpi.io

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "dbmpi"

# (a) Modules that must import without mpi4py.
MPI_FREE_MODULES = sorted({
    "dbmpi.config",
    "dbmpi.data",
    *(f"dbmpi.data.{m.name}" for m in pkgutil.iter_modules(dbmpi.data.__path__)),
    *(f"dbmpi.io.{m.name}" for m in pkgutil.iter_modules(dbmpi.io.__path__)),
    "dbmpi.model.layers",
    "dbmpi.model.network",
    "dbmpi.parallel.partition",
    "dbmpi.runtime.layout",
    "dbmpi.runtime.memory",
    "dbmpi.runtime.poll",
    "dbmpi.runtime.faults",
    "dbmpi.runtime.signals",
    "dbmpi.runtime.procfs",
    "dbmpi.runtime.supervise",  # the parent of a rank: it must not initialise MPI
    "dbmpi.algorithms.lbfgs",
    "dbmpi.algorithms.portions",
    "dbmpi.algorithms.optimizers",
    "dbmpi.algorithms.minibatches",
    "dbmpi.algorithms.sgd",
    "dbmpi.algorithms.divergence",
    "dbmpi.algorithms.replica",
    "dbmpi.algorithms.coordinator",
    "dbmpi.ps.staleness",
    "dbmpi.evaluation",
    "dbmpi.plot",
})

# (b) The only files (paths relative to the repository; a trailing / is a whole package)
# that may import mpi4py.
MPI_ALLOWED = (
    "dbmpi/runtime/",
    "dbmpi/ps/",
    "dbmpi/model/partitioned.py",
    "dbmpi/cli.py",
)

# (c) Private modules and the one file allowed to import each.
PRIVATE_MODULE_OWNERS = {"dbmpi._kernels": "dbmpi/kernels.py"}

# (d) Longest function allowed, in lines from `def` to its last line (docstring included).
MAX_FUNCTION_LINES = 80
LONG_FUNCTIONS_ALLOWED = {("dbmpi/cli.py", "build_parser")}  # argparse parser builders


def _sources():
    """(path relative to the repository, parsed module) of every .py file in dbmpi/."""
    for path in sorted(PACKAGE.rglob("*.py")):
        yield path.relative_to(ROOT).as_posix(), ast.parse(path.read_text(), str(path))


def _module_name(rel: str) -> str:
    name = rel[:-len(".py")].replace("/", ".")
    return name[:-len(".__init__")] if name.endswith(".__init__") else name


def _imported_modules(rel: str, tree: ast.AST):
    """(line, absolute module name, names imported from it or None) of every import."""
    here = _module_name(rel).split(".")
    package = here if rel.endswith("__init__.py") else here[:-1]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name, None
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:  # relative: from .x import y
                base = package[:len(package) - (node.level - 1)]
                module = ".".join(base + ([module] if module else []))
            yield node.lineno, module, [alias.name for alias in node.names]


def _is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


# ------------------------------------------------------------------------------ (a) MPI-free

@pytest.mark.parametrize("module", MPI_FREE_MODULES)
def test_mpi_free_module_does_not_import_mpi4py(module):
    code = (f"import importlib, sys; importlib.import_module({module!r}); "
            "sys.exit(3 if 'mpi4py' in sys.modules else 0)")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode != 3, f"importing {module} imports mpi4py"
    assert result.returncode == 0, result.stderr[-3000:]


# ------------------------------------------------------------------------- (b) who uses MPI

def _mpi_importers() -> list[str]:
    found = []
    for rel, tree in _sources():
        for line, module, _ in _imported_modules(rel, tree):
            if module.split(".")[0] == "mpi4py":
                found.append(f"{rel}:{line}")
    return found


def test_only_the_mpi_layer_imports_mpi4py():
    outside = [where for where in _mpi_importers() if not where.split(":")[0].startswith(MPI_ALLOWED)]
    assert not outside, f"mpi4py imported outside the MPI layer {MPI_ALLOWED}: {outside}"


def test_mpi_free_modules_do_not_import_mpi4py_even_lazily():
    """(a) imports each module; this reads it, so an import inside a function counts too
    (dbmpi.runtime.layout is MPI-free although dbmpi/runtime/ may use MPI)."""
    files = set()
    for module in MPI_FREE_MODULES:
        path = module.replace(".", "/")
        files.add(path + "/__init__.py" if (ROOT / path).is_dir() else path + ".py")
    lazy = [where for where in _mpi_importers() if where.split(":")[0] in files]
    assert not lazy, f"MPI-free modules that import mpi4py: {lazy}"


# ------------------------------------------------------------------------ (c) private names

def _private_imports() -> set[tuple[str, str]]:
    """(importer, "module._name" or "module") of every private name or module it imports."""
    found = set()
    for rel, tree in _sources():
        own = _module_name(rel)
        for _, module, names in _imported_modules(rel, tree):
            if module.split(".")[0] != "dbmpi":
                continue
            private_module = next((m for m in PRIVATE_MODULE_OWNERS
                                   if module == m or module.startswith(m + ".")), None)
            if private_module is not None and PRIVATE_MODULE_OWNERS[private_module] != rel:
                found.add((rel, module))
            if module == own or private_module is not None:
                continue
            found.update((rel, f"{module}.{name}") for name in names or () if _is_private(name))
    return found


def test_no_new_private_imports_across_modules():
    found = sorted(_private_imports())
    assert not found, ("private names imported from another dbmpi module (make the name public in "
                     f"the module that owns it, or move the function): {found}")


# ---------------------------------------------------------------------- (d) function length

def _long_functions() -> dict[tuple[str, str], int]:
    found = {}
    for rel, tree in _sources():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES and (rel, node.name) not in LONG_FUNCTIONS_ALLOWED:
                    found[(rel, node.name)] = lines
    return found


def test_no_new_function_over_the_length_limit():
    found = _long_functions()
    assert not found, f"functions over {MAX_FUNCTION_LINES} lines (split them): {found}"


# ------------------------------------------------------------------- the scanners themselves

def test_the_scanners_see_what_they_look_for():
    """A rule that matched nothing would pass forever: check each scanner finds a known case."""
    assert any(where.startswith("dbmpi/ps/") for where in _mpi_importers())
    tree = ast.parse("from dbmpi.data import _hidden\nfrom . import _sibling\n")
    imports = list(_imported_modules("dbmpi/io/x.py", tree))
    assert imports == [(1, "dbmpi.data", ["_hidden"]), (2, "dbmpi.io", ["_sibling"])]
    assert _is_private("_hidden") and not _is_private("__version__") and not _is_private("check_fits")
