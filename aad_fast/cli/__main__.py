"""`python -m aad_fast.cli` = `aad-fast`."""
import sys

from . import main

sys.exit(main())
