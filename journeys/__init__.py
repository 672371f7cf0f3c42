"""Journeys: multi-step, per-recipient sequences advanced by ticks.

A package of its own (beside ``flows/``) because a journey is a concept of its own: it
sits on top of the same core (YAML, spec, workspace, database and its journey tables)
and delivery (policy, ledger, dispatch, templates, variants) as flows. The Prefect flow
of a tick is ``herald.flows.journey``. May import: core, audiences, channels, delivery,
reporting.

    spec        the YAML schema of ``config/journeys/NAME.yaml``
    load        loading with positions, and validation (``herald validate``)
    conditions  SQL conditions (exit_when, wait_for, branch) and the goal
    engine      the tick: prepare, run a chunk, finish (no Prefect here)
    entry       versions, and entering the entry segment's recipients (re-entry rules)
    chunks      a chunk's job and result, its enrollments, claiming them under a lease
    mover       moving a claimed chunk: exit checks, then rounds of one step each
    report      status, one path, per-step report with uplift over the holdout
    html        the journey's HTML report
"""
