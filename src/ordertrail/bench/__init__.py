"""Benchmarks that measure ordertrail beside the ceilings of the same machine.

Absolute figures on a shared machine say little; each benchmark measures the
service and a minimal baseline in the same run and reports their ratio.
"""
