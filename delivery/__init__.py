"""Delivery: who may be contacted, through which channel, and what happened.

Owns the contact policy (holdouts, suppression, caps, quiet hours), address cleaning,
the suppression list, rendering messages, dispatching them through channels, and the
ledger. May import: core, audiences, channels.
"""
