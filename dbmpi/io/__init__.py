"""Files: checkpoints, run directories, atomic writes."""
