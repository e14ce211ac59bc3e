# The seed's Python client (../shared/seeds/001_0e01ba0350cad506.txt, "Example Client
# Implementations" > "Python"), copied unchanged. The test suite substitutes only its URL
# (tests/seed_python_client.rs) and runs it against the real server.
import asyncio
import json
import websockets

class IncidentManagerClient:
    def __init__(self, url):
        self.url = url
        self.handlers = {}

    async def connect(self):
        async with websockets.connect(self.url) as ws:
            self.ws = ws

            # Receive welcome
            welcome = await ws.recv()
            msg = json.loads(welcome)
            self.session_id = msg['session_id']

            # Start message loop
            await self.message_loop()

    async def subscribe(self, filters, handler):
        sub_id = f"sub-{len(self.handlers)}"
        self.handlers[sub_id] = handler

        await self.send({
            'type': 'subscribe',
            'subscription_id': sub_id,
            'filters': filters
        })

        return sub_id

    async def message_loop(self):
        async for message in self.ws:
            msg = json.loads(message)

            if msg['type'] == 'event':
                await self.handle_event(msg['event'])

    async def handle_event(self, event):
        for handler in self.handlers.values():
            await handler(event)

    async def send(self, message):
        await self.ws.send(json.dumps(message))

# Usage
async def on_incident(event):
    print(f"Incident: {event}")

async def main():
    client = IncidentManagerClient('ws://localhost:8080/ws')

    async with websockets.connect(client.url) as ws:
        client.ws = ws

        # Wait for welcome
        welcome = await ws.recv()

        # Subscribe
        await client.subscribe({
            'event_types': ['incident_created']
        }, on_incident)

        # Listen for events
        await client.message_loop()

asyncio.run(main())
