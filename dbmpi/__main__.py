"""`python -m dbmpi` is the `dbmpi` command."""
import sys

from dbmpi.cli import main

sys.exit(main())
