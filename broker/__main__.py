"""`python -m broker`: run the broker (see `broker --help`)."""

import sys

from broker.server import main

sys.exit(main())
