"""Reporting: what runs did and what they achieved, read from the ledger.

Owns run views, conversion statistics (Wilson / Newcombe), the HTML report, and the
write-back of ledger and results into an analysts' database. May import: core,
audiences, delivery.
"""
