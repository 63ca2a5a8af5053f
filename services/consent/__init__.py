"""Consent: the exchange's single policy decision point for clinical data."""
