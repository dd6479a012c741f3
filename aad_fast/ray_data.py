"""Where users import the Ray Data jobs from (``aad_fast.ray_data.generate``, ``map_dataset``, ...);
the code lives in ``aad_fast.jobs.ray_data``."""
from .jobs.ray_data import *  # noqa: F401,F403
from .jobs.ray_data import Generate, generate, map_dataset, run_rows  # noqa: F401
from .toy.ray_pairs import MakePairs, pairs_decoder  # noqa: F401
