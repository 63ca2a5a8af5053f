"""Audit log: the exchange's append-only, hash-chained record of every exchange."""
