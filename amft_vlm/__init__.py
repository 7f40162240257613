"""amft-vlm: rollouts, losses, the AMFT learner, evaluation and the command line.

Importing it registers the environments (``GeneralPoints-v0``, ``VIRL-v0``) with Gymnasium.
"""

import environments  # noqa: F401  (registers the environments)

__version__ = "0.1.0"
