"""Run the consent service: `python -m services.consent`."""

from services.consent.service import SPEC
from services.shared.process import main

main(SPEC)
