"""The MPI runtime: rank layout, communicators, signals, failure detection, process supervision."""
