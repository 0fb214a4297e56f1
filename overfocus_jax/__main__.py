"""``python -m overfocus_jax`` is the ``overfocus`` command."""

import sys

from overfocus_jax.cli import main

sys.exit(main())
