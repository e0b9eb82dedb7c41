"""Verifies deliveries with the Standard Webhooks reference library from PyPI
(`standardwebhooks`), driven by broker-cli/tests/it/standard_webhooks.rs.

Reads one JSON object from stdin: {"secret": str, "deliveries": [{"body_b64": str,
"headers": {name: value}}]}; prints one JSON line per delivery: {"ok": true} or
{"ok": false, "error": str}.
"""

import base64
import json
import sys

from standardwebhooks.webhooks import Webhook


def main() -> None:
    req = json.load(sys.stdin)
    hook = Webhook(req["secret"])
    for d in req["deliveries"]:
        body = base64.b64decode(d["body_b64"])
        try:
            hook.verify(body, d["headers"], json_parse=False)
            print(json.dumps({"ok": True}))
        except Exception as e:  # the library raises WebhookVerificationError
            print(json.dumps({"ok": False, "error": repr(e)}))


if __name__ == "__main__":
    main()
