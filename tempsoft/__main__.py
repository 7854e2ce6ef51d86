"""``python -m tempsoft ...`` runs the command line (also under ``torchrun -m tempsoft``)."""
import sys

from tempsoft.cli import main

sys.exit(main())
