"""``python -m innfer`` runs the command line."""

import sys

from innfer.cli import main

sys.exit(main())
