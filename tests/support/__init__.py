"""Helpers the tests share (hospitals, receivers, factories, FHIR rules): imported by tests,
never themselves collected as tests."""
