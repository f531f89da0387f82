"""Operators acting on a running run: requests checked here, applied by the ServerApp at round boundaries."""
