"""Flows: the top of the house. The engine that runs a campaign (``engine``: prepare,
chunks, finish; no Prefect), validation and preview, the Prefect flows and their wiring
(``campaign``, ``conversion_report``, ``deploy``, ``artifacts``) and the command line
(``cli``, one module per command group). May import: every other package.
"""
