"""Run the audit service: `python -m services.audit`."""

from services.audit.service import SPEC
from services.shared.process import main

main(SPEC)
