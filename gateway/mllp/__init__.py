"""The HL7 v2 (MLLP) ingress beside the gateway: legacy HIS ADT feeds into the mpi over gRPC.

`python -m gateway.mllp` runs it as its own process (`hie up` starts one; HIE_MLLP_PORT /
HIE_MLLP_HOST say where it listens). `hl7v2.py` reads and answers messages (pure), `feed.py`
applies them through the mpi's API with the sending facility's identity.
"""
