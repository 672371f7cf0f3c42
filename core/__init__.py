"""Herald's core: what every other package builds on, and which imports none of them.

Errors, YAML loading, the spec models, the workspace, the database and its tables, and
the one clock that every time decision reads.
"""
