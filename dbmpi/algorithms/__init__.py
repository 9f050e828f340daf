"""Training algorithms: serial SGD, Downpour SGD, Sandblaster L-BFGS and their pure parts."""
