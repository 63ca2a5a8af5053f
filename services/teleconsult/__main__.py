"""Run the teleconsult service: `python -m services.teleconsult`."""

from services.shared.process import main
from services.teleconsult.service import SPEC

main(SPEC)
