"""Run the referral service: `python -m services.referral`."""

from services.referral.service import SPEC
from services.shared.process import main

main(SPEC)
