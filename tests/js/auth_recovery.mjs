// The clients/js module against a broker with auth on (HS256 secret, leeway 0) and history on:
// tokens minted here with node:crypto, a refused upgrade (Node's `ws` exposes the 401), typed
// forbidden errors, refresh through a token function past the first token's exp, close 4001
// without one (PART "auth"); history() and recovery across dropped sockets (PART "recovery").
// Run by tests/clients/test_node.py:
//   node auth_recovery.mjs WS_URL CLIENT_MODULE_PATH SECRET PART
// Prints one JSON object per step; exits 0 when done, non-zero with {"error": ...} on failure.
import { createHmac } from "node:crypto";
import { pathToFileURL } from "node:url";
import WebSocket from "ws";

const [url, clientPath, secret, part] = process.argv.slice(2);
const out = (obj) => console.log(JSON.stringify(obj));
const fail = (error) => {
  out({ error: String(error && error.stack ? error.stack : error) });
  process.exit(1);
};
setTimeout(() => fail("timed out after 40 s"), 40000).unref();
process.on("unhandledRejection", fail);
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

const m = await import(pathToFileURL(clientPath).href);
const { BrokerClient } = m;

/** An HS256 JWT for `claims`, with iat and exp (now + ttl seconds). */
function mint(claims, ttl = 60) {
  const now = Math.floor(Date.now() / 1000);
  const enc = (obj) => Buffer.from(JSON.stringify(obj)).toString("base64url");
  const body = `${enc({ alg: "HS256", typ: "JWT" })}.${enc({ sub: "node", iat: now, exp: now + ttl, ...claims })}`;
  return `${body}.${createHmac("sha256", secret).update(body).digest("base64url")}`;
}
const rights = { publish: ["node.>"], subscribe: ["node.>"] };
const collect = (client, type) => {
  const seen = [];
  client.addEventListener(type, (e) => seen.push(e.detail));
  return seen;
};
const describe = (err) => err && ({ name: err.name, code: err.code ?? null, status: err.status ?? null });

const publisher = await new BrokerClient(url, { WebSocket, token: mint(rights) }).connect();

// 1. A bad token: the upgrade is refused with 401, which Node's ws lets the client see.
if (part === "auth") {
  const client = new BrokerClient(url, { WebSocket, token: "not.a.token", reconnect: false });
  const errors = collect(client, "error");
  const err = await client.connect().then(() => null, (e) => e);
  out({ step: "refused", error: describe(err), events: errors.map(describe), state: client.state,
        refused: err instanceof m.ConnectionRefusedError });
}

// 2. A good token: allowed requests work, the others are rejected with ForbiddenError.
if (part === "auth") {
  const client = await new BrokerClient(url, { WebSocket, token: mint(rights) }).connect();
  const sub = await client.subscribe("node.a");
  const delivered = await client.publish("node.a", 1);
  const message = (await sub.next()).value;
  const publish = await client.publish("elsewhere.a", 1).then(() => null, (e) => e);
  const subscribe = await client.subscribe("elsewhere.>").then(() => null, (e) => e);
  // A narrower token handed over with the auth op: the subscription it no longer allows ends.
  const other = await client.subscribe("node.b");
  const errors = collect(client, "error");
  const revoked = await client.setToken(mint({ publish: ["node.a"], subscribe: ["node.a"] }));
  const ended = await other.next().then(() => null, (e) => e);
  out({ step: "token", delivered, message,
        publish: { ...describe(publish), forbidden: publish instanceof m.ForbiddenError },
        subscribe: describe(subscribe), revoked, ended: describe(ended),
        errors: errors.map(describe), subscriptions: client.subscriptions });
  client.close();
}

// 3. A token function: the first token lives 3 s, the refresh (auth op) keeps the same socket.
if (part === "auth") {
  const tokens = [];
  const token = async () => {
    await sleep(10);
    tokens.push(mint(rights, tokens.length ? 60 : 3));
    return tokens.at(-1);
  };
  const client = new BrokerClient(url, { WebSocket, token });
  const states = collect(client, "state");
  const expired = collect(client, "tokenexpired");
  await client.connect();
  const socket = client._ws;
  const firstExp = m.tokenClaims(tokens[0]).exp;
  while (Date.now() < firstExp * 1000 + 1500) await sleep(100);
  const delivered = await client.publish("node.refresh", "still here");
  out({ step: "refresh", tokens: tokens.length, sameSocket: client._ws === socket, delivered,
        states: states.map((s) => s.state), expired: expired.length });
  client.close();
}

// 3b. Every connection attempt asks the token function: a dropped socket reconnects with a new one.
if (part === "auth") {
  const handed = [];
  const token = () => handed.push(mint({ ...rights, n: handed.length })) && handed.at(-1);
  const client = new BrokerClient(url, { WebSocket, token });
  await client.connect();
  client._ws.terminate();
  while (client.state === "connected") await sleep(10);
  await client.connect();
  out({ step: "reconnect token", calls: handed.length, distinct: new Set(handed).size,
        delivered: await client.publish("node.again", 1) });
  client.close();
}

// 4. A fixed token that expires: close 4001, a "tokenexpired" event, and the client closes.
if (part === "auth") {
  const client = new BrokerClient(url, { WebSocket, token: mint(rights, 2) });
  const expired = collect(client, "tokenexpired");
  await client.connect();
  const started = Date.now();
  while (client.state !== "closed" && Date.now() - started < 5000) await sleep(50);
  const closedWith = client.state === "closed" ? await client.ping().then(() => null, (e) => e) : null;
  out({ step: "expired", state: client.state, events: expired.map((e) => ({ ...describe(e.error), reconnect: e.reconnect })),
        error: closedWith && describe(closedWith) });
}

// 5. history(): what the topic retains, from the start or after a position, with a limit.
if (part === "recovery") {
  const client = await new BrokerClient(url, { WebSocket, token: mint(rights) }).connect();
  for (let i = 1; i <= 5; i++) await publisher.publish("node.h", { i });
  const all = await client.history("node.h");
  const after = await client.history("node.h", { since: { epoch: all.epoch, seq: 2 }, limit: 2 });
  const stale = await client.history("node.h", { since: { epoch: "nosuchepoch", seq: 2 } });
  const denied = await client.history("elsewhere.h").then(() => null, (e) => e);
  out({ step: "history", all, after, stale: { recovered: stale.recovered, count: stale.messages.length },
        denied: describe(denied) });
  client.close();
}

// 6. Recovery: the subscriber's socket is dropped three times (abruptly and cleanly) while a
// publisher keeps going; every message arrives once, in order.
if (part === "recovery") {
  const client = new BrokerClient(url, { WebSocket, token: mint(rights), minDelay: 50, maxDelay: 200 });
  const recovered = collect(client, "recovered");
  const unrecovered = collect(client, "unrecovered");
  await client.connect();
  const seqs = [];
  const wild = [];
  const sub = await client.subscribe("node.r", (msg) => seqs.push(msg.seq));
  await client.subscribe("node.*", (msg) => msg.topic === "node.r" && wild.push(msg.seq));
  const total = 300;
  const drops = { 60: "terminate", 140: "close", 220: "terminate" };
  for (let i = 1; i <= total; i++) {
    await publisher.publish("node.r", { i }, { ack: i % 10 === 0 });
    if (drops[i]) {
      while (client.state !== "connected") await sleep(5); // drop a socket that is up
      client._ws[drops[i]]();
    }
    if (i % 20 === 0) await sleep(5);
  }
  await publisher.ping();
  const started = Date.now();
  while (seqs.length < total && Date.now() - started < 10000) await sleep(50);
  await sleep(200); // a duplicate would arrive now
  const expected = Array.from({ length: total }, (_, i) => i + 1);
  out({ step: "recovery", count: seqs.length, inOrder: JSON.stringify(seqs) === JSON.stringify(expected),
        recovered: recovered.length, unrecovered: unrecovered.map((u) => [u.topic, u.reason]),
        wildCount: wild.length, position: sub.position, epoch: recovered[0] && recovered[0].epoch });
  client.close();
}
// 7. A token function that has nothing newer until the first token ran out: the broker closes
// with 4001, the client reconnects with the next token and recovers what it missed meanwhile.
if (part === "recovery") {
  const first = mint(rights, 2);
  const token = () => (Date.now() < m.tokenClaims(first).exp * 1000 ? first : mint(rights));
  const client = new BrokerClient(url, { WebSocket, token, minDelay: 300, maxDelay: 300, jitter: 0 });
  const expired = collect(client, "tokenexpired");
  const recovered = collect(client, "recovered");
  await client.connect();
  const seqs = [];
  await client.subscribe("node.x", (msg) => seqs.push(msg.seq));
  let i = 0;
  while (client.state === "connected") {
    await publisher.publish("node.x", ++i);
    await sleep(20);
  }
  for (let j = 0; j < 5; j++) await publisher.publish("node.x", ++i); // while it reconnects
  await client.connect();
  await publisher.publish("node.x", ++i);
  const started = Date.now();
  while (seqs.length < i && Date.now() - started < 5000) await sleep(20);
  out({ step: "expired and recovered", published: i, seqs,
        expired: expired.map((e) => ({ ...describe(e.error), reconnect: e.reconnect })),
        recovered: recovered.length });
  client.close();
}
publisher.close();
out({ step: "done" });
process.exit(0);
