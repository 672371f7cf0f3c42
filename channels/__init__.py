"""Channels: one adapter per module (outbox, smtp, sms, wechat, webhook), their base class
(``base``), the registry of channel types (``registry``, over the ``herald.channels``
entry points), and what adapters share (``http``: the HTTP pool, transport and answer
classification; ``mime``: e-mail as MIME). An adapter sends and classifies answers;
throttling, retries, body limits and the ledger are the dispatcher's
(``herald.delivery``). May import: core.
"""
