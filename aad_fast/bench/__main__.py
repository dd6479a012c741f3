"""``python -m aad_fast.bench``: the same benchmark as ``aad-fast bench``."""
import sys

from . import main

sys.exit(main())
