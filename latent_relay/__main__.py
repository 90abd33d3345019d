"""``python -m latent_relay ...`` is the ``relay`` command (see :mod:`latent_relay.relay.cli`)."""

import sys

from latent_relay.relay.cli import main

sys.exit(main())
