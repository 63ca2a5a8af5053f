"""The HL7 FHIR R4 facade, one module per resource (`patient/` one per IHE transaction); the
CapabilityStatement is assembled in capability.py from what each module declares."""
