"""`python -m broker_client` runs `broker-cli`."""

from .cli import main

main()
