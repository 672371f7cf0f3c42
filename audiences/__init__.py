"""Audiences: segment SQL in, immutable audience packages out.

Owns reading and binding segment SQL (``sql``), the package store in the workspace
database (``store``), exporting packages (``export``) and the deterministic demo shop
(``demo_shop``). May import: core.
"""
