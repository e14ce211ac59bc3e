#!/usr/bin/env python3
"""Watch an incident-stream: prints every frame the server sends, one JSON object per line.

    .venv/bin/python examples/watch.py ws://127.0.0.1:8443/ws "$TOKEN" '{"severities":["P0","P1"]}'

The token travels in the Authorization header; the filter (optional) is a subscription filter.
"""
import asyncio
import json
import sys

import websockets


async def main(url: str, token: str, filters: dict) -> None:
    headers = {"Authorization": f"Bearer {token}"}
    async with websockets.connect(url, additional_headers=headers) as ws:
        welcome = json.loads(await ws.recv())
        print(f"connected: session {welcome['session_id']} tenant {welcome['tenant']}", file=sys.stderr)
        await ws.send(json.dumps({"type": "subscribe", "subscription_id": "watch", "filters": filters}))
        async for raw in ws:
            print(raw, flush=True)


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    asyncio.run(main(sys.argv[1], sys.argv[2], json.loads(sys.argv[3]) if len(sys.argv) > 3 else {}))
