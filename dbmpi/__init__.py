"""dbmpi: DistBelief (Dean et al., NIPS 2012) in Python on MPI.

Importing dbmpi checks that the compiled kernels are built and says how to build them if not.
"""
__version__ = "0.1.0"

from dbmpi import kernels  # noqa: E402,F401  (fails with build instructions when unbuilt)
