"""Model parallelism: partition plans over the ranks of a replica."""
