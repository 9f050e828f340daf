"""Build the Cython kernels in cython_kernels/ as extension modules dbmpi._kernels.<name>.

BLAS comes from scipy.linalg.cython_blas, so no system BLAS headers or libraries are needed.
Set DBMPI_NATIVE=1 to compile with -march=native (only when every node has the same CPU).
"""
import glob
import os

import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup

# -fno-math-errno: sqrtf need not set errno, so loops with a square root vectorise (Adagrad);
# the results are the same IEEE-rounded values.
compile_args = ["-O3", "-fno-math-errno"]
if os.environ.get("DBMPI_NATIVE") == "1":
    compile_args.append("-march=native")

extensions = [
    Extension(
        f"dbmpi._kernels.{os.path.splitext(os.path.basename(source))[0]}",
        [source],
        include_dirs=[numpy.get_include(), "cython_kernels"],
        extra_compile_args=compile_args,
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
    )
    for source in sorted(glob.glob("cython_kernels/*.pyx"))
]

setup(
    ext_modules=cythonize(
        extensions,
        include_path=["cython_kernels"],
        compiler_directives={
            "language_level": "3",
            "boundscheck": False,
            "wraparound": False,
            "cdivision": True,
            "initializedcheck": False,
        },
    )
)
