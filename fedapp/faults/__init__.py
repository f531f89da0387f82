"""Faults made on purpose (``faults.*``): client crashes, hangs, stragglers, lost connections,
malformed and replayed updates, and SuperNodes killed and restarted on a schedule."""

from fedapp.faults.malform import malform
from fedapp.faults.plan import CLIENT_FAULTS, MALFORMATIONS, NodeAction, fault_for, node_schedule, validate_faults

__all__ = ["CLIENT_FAULTS", "MALFORMATIONS", "NodeAction", "fault_for", "malform", "node_schedule", "validate_faults"]
