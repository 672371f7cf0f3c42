"""Audiences: segment SQL in, immutable audience packages out.

Owns reading and binding segment SQL (``sql``), the package store in the workspace
database (``store``), exporting packages (``export``) and the deterministic demo shop
(``demo_shop``: its tables and database; ``demo_rows``: the rows; ``demo_response``: a
simulated response to a campaign). May import: core.
"""
