"""Operator tooling: the `hie` command, the demo and the benchmark harnesses."""
