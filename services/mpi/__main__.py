"""Run the mpi service: `python -m services.mpi`."""

from services.mpi.service import SPEC
from services.shared.process import main

main(SPEC)
