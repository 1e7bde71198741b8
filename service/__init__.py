"""Refrain's REST service and command line."""
