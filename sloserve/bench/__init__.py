"""The SLO benchmark harness: workloads, targets, runs, capacity search and reports.

Definitions follow docs/slo.md (the methodology).
"""
