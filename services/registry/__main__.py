"""Run the registry service: `python -m services.registry`."""

from services.registry.service import SPEC
from services.shared.process import main

main(SPEC)
