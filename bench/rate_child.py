"""One of the processes of the ``rate`` stage: sends messages through the webhook channel
under the channel's shared rate limit, as the dispatcher does, then exits.

    python bench/rate_child.py STORE_URL ROOT URL FIRST COUNT RATE
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path


def main() -> None:
    from herald.channels.base import ChannelContext, Message
    from herald.channels.webhook import WebhookChannel, WebhookSettings
    from herald.core.db import open_store
    from herald.delivery.dispatch import send_paced
    from herald.delivery.ratelimit import limiter_for

    store_url, root, url, first, count, rate = sys.argv[1:7]
    store = open_store(store_url, Path(root))
    limiter = limiter_for(store, "hook", float(rate))
    messages = [Message(recipient=str(i), address="", kind="webhook",
                        body=f"Customer {i}, your points are waiting.",
                        message_id=f"<{i}.rate@herald>")
                for i in range(int(first), int(first) + int(count))]

    async def send() -> None:
        settings = WebhookSettings(type="webhook", url=url)
        context = ChannelContext(Path(root), "bench", "rate", "run-rate")
        async with WebhookChannel("hook", settings, context) as channel:
            size = WebhookChannel.batch_size  # the dispatcher's batches
            for start in range(0, len(messages), size):
                results = await send_paced(channel, messages[start:start + size], limiter)
                assert all(r.outcome.value == "sent" for r in results), results[0]

    asyncio.run(send())
    store.dispose()


if __name__ == "__main__":
    main()
