"""sloserve: LLM serving that keeps each application's latency SLOs under bursty shared load."""

__version__ = "0.1.0"
