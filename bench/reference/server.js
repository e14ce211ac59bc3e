// Reference servers for the benchmark: the subset of incident-stream's protocol that
// `loadgen` speaks, on uWebSockets (uWS.js, the C++ library with Node bindings) or on Node's
// `ws`, so the reference figures can be measured with our own load generator on this
// machine. Not a product: one tenant topic per token, no filters beyond the tenant, no limits.
//
//   node server.js uws|ws        prints "listening on http://127.0.0.1:PORT"
//
// What it does, as incident-stream does it:
// - GET /ws with `Authorization: Bearer <HS256 JWT>`: the signature and `exp` are checked with
//   the secret in $BENCH_SECRET; the `tenant` claim picks the topic. A bad token gets 401.
// - On open: a `welcome` frame. `subscribe` gets `subscribed` and joins the tenant's topic.
// - POST /v1/events with a JSON array of events: each becomes one `event` frame
//   ({"type":"event","message_id","timestamp","event":{"id","tenant","received_at",...}}),
//   serialized once and published to the tenant's topic; the answer is 202 with the ids.
// - GET /ready answers 200.
// Loopback only: it listens on 127.0.0.1.
'use strict';
const crypto = require('crypto');

const impl = process.argv[2] || 'uws';
const secret = process.env.BENCH_SECRET;
if (!secret) {
  console.error('BENCH_SECRET must hold the HS256 secret');
  process.exit(2);
}

function b64urlJson(part) {
  return JSON.parse(Buffer.from(part, 'base64url').toString('utf8'));
}

// The token's claims, or null: HS256 signature (constant-time compare) and expiry.
function verify(auth) {
  if (!auth || !auth.startsWith('Bearer ')) return null;
  const parts = auth.slice(7).split('.');
  if (parts.length !== 3) return null;
  try {
    const header = b64urlJson(parts[0]);
    if (header.alg !== 'HS256') return null;
    const mac = crypto.createHmac('sha256', secret).update(parts[0] + '.' + parts[1]).digest();
    const sig = Buffer.from(parts[2], 'base64url');
    if (sig.length !== mac.length || !crypto.timingSafeEqual(sig, mac)) return null;
    const claims = b64urlJson(parts[1]);
    if (typeof claims.tenant !== 'string' || !(claims.exp > Date.now() / 1000)) return null;
    return claims;
  } catch (e) {
    return null;
  }
}

let seq = 0;
// One frame per event, serialized once for every subscriber.
function eventFrames(tenant, body) {
  const events = JSON.parse(body);
  if (!Array.isArray(events)) throw new Error('not an array');
  const now = new Date();
  const ts = now.toISOString();
  return events.map((ev) => {
    const id = `${now.getTime()}-${seq++}`;
    const event = Object.assign({ id: crypto.randomUUID(), tenant, received_at: ts }, ev);
    return { id, frame: JSON.stringify({ type: 'event', message_id: id, timestamp: ts, event }) };
  });
}

function welcome() {
  return JSON.stringify({ type: 'welcome', session_id: crypto.randomUUID(), server: 'reference-' + impl });
}

function onClientMessage(text, send, join) {
  let m;
  try {
    m = JSON.parse(text);
  } catch (e) {
    send(JSON.stringify({ type: 'error', code: 'invalid_message' }));
    return;
  }
  if (m.type === 'subscribe') {
    join();
    send(JSON.stringify({ type: 'subscribed', subscription_id: m.subscription_id }));
  } else if (m.type === 'ping') {
    send(JSON.stringify({ type: 'pong' }));
  }
}

function announce(port) {
  console.log(`listening on http://127.0.0.1:${port} (${impl})`);
}

if (impl === 'uws') {
  const uWS = require('@trufflesuite/uws-js-unofficial');
  const app = uWS.App();
  app.ws('/ws', {
    compression: uWS.DISABLED,
    maxPayloadLength: 64 * 1024,
    maxBackpressure: 4 * 1024 * 1024,
    idleTimeout: 120,
    upgrade: (res, req, context) => {
      const claims = verify(req.getHeader('authorization'));
      if (!claims) {
        res.writeStatus('401 Unauthorized').end();
        return;
      }
      res.upgrade(
        { tenant: claims.tenant },
        req.getHeader('sec-websocket-key'),
        req.getHeader('sec-websocket-protocol'),
        req.getHeader('sec-websocket-extensions'),
        context,
      );
    },
    open: (ws) => {
      ws.send(welcome(), false);
    },
    message: (ws, message, isBinary) => {
      const tenant = ws.getUserData().tenant;
      onClientMessage(
        Buffer.from(message).toString('utf8'),
        (s) => ws.send(s, false),
        () => ws.subscribe('tenant/' + tenant),
      );
    },
  });
  app.post('/v1/events', (res, req) => {
    const claims = verify(req.getHeader('authorization'));
    if (!claims) {
      res.writeStatus('401 Unauthorized').end();
      return;
    }
    const chunks = [];
    let aborted = false;
    res.onAborted(() => {
      aborted = true;
    });
    res.onData((ab, isLast) => {
      chunks.push(Buffer.from(ab.slice(0)));
      if (!isLast) return;
      let frames;
      try {
        frames = eventFrames(claims.tenant, Buffer.concat(chunks).toString('utf8'));
      } catch (e) {
        if (!aborted) res.cork(() => res.writeStatus('400 Bad Request').end());
        return;
      }
      for (const f of frames) app.publish('tenant/' + claims.tenant, f.frame, false);
      if (!aborted) {
        res.cork(() => {
          res.writeStatus('202 Accepted').writeHeader('content-type', 'application/json');
          res.end(JSON.stringify({ message_ids: frames.map((f) => f.id) }));
        });
      }
    });
  });
  app.get('/ready', (res) => {
    res.end('ok');
  });
  app.listen('127.0.0.1', 0, (token) => {
    if (!token) {
      console.error('listen failed');
      process.exit(1);
    }
    announce(uWS.us_socket_local_port(token));
  });
} else if (impl === 'ws') {
  const http = require('http');
  const { WebSocketServer } = require('ws');
  const topics = new Map(); // tenant -> Set of sockets
  const wss = new WebSocketServer({ noServer: true, perMessageDeflate: false, maxPayload: 64 * 1024 });
  const server = http.createServer((req, res) => {
    if (req.method === 'GET' && req.url === '/ready') {
      res.end('ok');
      return;
    }
    if (req.method !== 'POST' || req.url !== '/v1/events') {
      res.writeHead(404).end();
      return;
    }
    const claims = verify(req.headers.authorization);
    if (!claims) {
      res.writeHead(401).end();
      return;
    }
    const chunks = [];
    req.on('data', (c) => chunks.push(c));
    req.on('end', () => {
      let frames;
      try {
        frames = eventFrames(claims.tenant, Buffer.concat(chunks).toString('utf8'));
      } catch (e) {
        res.writeHead(400).end();
        return;
      }
      const subs = topics.get(claims.tenant);
      if (subs) {
        for (const f of frames) {
          const buf = Buffer.from(f.frame);
          for (const ws of subs) ws.send(buf, { binary: false });
        }
      }
      res.writeHead(202, { 'content-type': 'application/json' });
      res.end(JSON.stringify({ message_ids: frames.map((f) => f.id) }));
    });
  });
  server.on('upgrade', (req, socket, head) => {
    const claims = verify(req.headers.authorization);
    if (!claims || req.url !== '/ws') {
      socket.end('HTTP/1.1 401 Unauthorized\r\n\r\n');
      return;
    }
    wss.handleUpgrade(req, socket, head, (ws) => {
      socket.setNoDelay(true);
      ws.send(welcome());
      ws.on('message', (data) =>
        onClientMessage(
          data.toString('utf8'),
          (s) => ws.send(s),
          () => {
            if (!topics.has(claims.tenant)) topics.set(claims.tenant, new Set());
            topics.get(claims.tenant).add(ws);
          },
        ),
      );
      ws.on('close', () => topics.get(claims.tenant)?.delete(ws));
    });
  });
  server.listen(0, '127.0.0.1', () => announce(server.address().port));
} else {
  console.error('usage: node server.js uws|ws');
  process.exit(2);
}
