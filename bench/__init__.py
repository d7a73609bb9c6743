"""Benchmarks: one home (`transact bench ...`), one writer (table + JSON naming the machine)."""
