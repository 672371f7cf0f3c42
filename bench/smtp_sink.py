"""A local SMTP server that accepts and discards mail (the benchmarks' peer).

    python bench/smtp_sink.py PORT      # prints "ready" once listening
"""

from __future__ import annotations

import signal
import sys
import time

from aiosmtpd.controller import Controller


class Sink:
    async def handle_DATA(self, server: object, session: object, envelope: object) -> str:  # noqa: N802
        return "250 OK"


def main() -> None:
    controller = Controller(Sink(), hostname="127.0.0.1", port=int(sys.argv[1]))
    controller.start()
    print("ready", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        while True:
            time.sleep(3600)
    finally:
        controller.stop()


if __name__ == "__main__":
    main()
