"""Where the labelling job's names used to live: it is now the package :mod:`cluster.label` (config, plan,
stages, job, review), and :class:`PoolConfig` is in :mod:`cluster.raypool`. The public names are re-exported
here so that imports of ``cluster.labelling`` keep working; new code imports from :mod:`cluster.label`."""

from cluster.label import *  # noqa: F401,F403
from cluster.label import __all__  # noqa: F401
