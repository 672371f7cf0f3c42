"""Create (or update) the notification block the failure-rate automation sends through,
and print its id for the automation's ``block_document_id``:

    BLOCK_ID=$(.venv/bin/python docs/automations/notification_block.py https://ops.example/hook)

A custom webhook posting ``{"text": subject: body}``; any other Prefect notification block
(Slack, Microsoft Teams, e-mail...) works the same: save it, use its id.
"""

import sys

from prefect.blocks.notifications import CustomWebhookNotificationBlock

if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: notification_block.py WEBHOOK_URL")
    block = CustomWebhookNotificationBlock(name="herald", url=sys.argv[1], method="POST",
                                           json_data={"text": "{{subject}}: {{body}}"})
    print(block.save("herald-alerts", overwrite=True))
