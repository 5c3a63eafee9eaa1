// Drive the broker from Node: a raw `ws` connection speaking protocol v1 by hand, and the
// clients/js module (given the `ws` WebSocket class) beside it. Run by tests/clients/test_node.py:
//   node pubsub.mjs WS_URL CLIENT_MODULE_PATH
// Prints one JSON object per line; "ready" means both are subscribed and the test may publish
// {"from": "python"} to node.raw.py, after which the script prints what each side received and
// exits 0. Any failure prints {"error": ...} and exits non-zero; the whole run is bounded.
import { pathToFileURL } from "node:url";
import WebSocket from "ws";

const [url, clientPath] = process.argv.slice(2);
const out = (obj) => console.log(JSON.stringify(obj));
const fail = (error) => {
  out({ error: String(error && error.stack ? error.stack : error) });
  process.exit(1);
};
setTimeout(() => fail("timed out after 15 s"), 15000).unref();
process.on("unhandledRejection", fail);

const { BrokerClient } = await import(pathToFileURL(clientPath).href);

// Raw ws: every frame is JSON text; requests resolve by id, messages queue up.
const raw = new WebSocket(url, ["pubsub.v1.json"]);
await new Promise((resolve, reject) => {
  raw.once("open", resolve);
  raw.once("error", reject);
});
if (raw.protocol !== "pubsub.v1.json") fail(`server picked subprotocol ${raw.protocol}`);
const replies = new Map();
const rawMessages = [];
let rawMessageWaiter = null;
raw.on("message", (data, isBinary) => {
  if (isBinary) fail("binary frame on a JSON connection");
  const msg = JSON.parse(data.toString());
  if (msg.op === "message") {
    rawMessages.push(msg);
    if (rawMessageWaiter) rawMessageWaiter();
  } else if (replies.has(msg.id)) {
    replies.get(msg.id)(msg);
  }
});
let nextId = 100;
const rawRequest = (body) =>
  new Promise((resolve) => {
    const id = nextId++;
    replies.set(id, resolve);
    raw.send(JSON.stringify({ ...body, id }));
  });
const rawMessage = async (count) => {
  while (rawMessages.length < count) await new Promise((resolve) => (rawMessageWaiter = resolve));
  return rawMessages[count - 1];
};

const subAck = await rawRequest({ op: "subscribe", topic: "node.raw.>" });
if (subAck.op !== "ack") fail(`subscribe: ${JSON.stringify(subAck)}`);
const pong = await rawRequest({ op: "ping" });
if (pong.op !== "pong") fail(`ping: ${JSON.stringify(pong)}`);

// The clients/js module over the same ws package.
const client = new BrokerClient(url, { WebSocket });
await client.connect();
const sub = await client.subscribe("node.>");
const clientMessages = [];
const iterate = (async () => {
  for await (const message of sub) {
    clientMessages.push(message);
    if (clientMessages.length === 3) return;
  }
})();

const rawAck = await rawRequest({ op: "publish", topic: "node.raw.x", data: { n: 1 } });
out({ step: "raw publish", ack: rawAck, message: await rawMessage(1) });
const delivered = await client.publish("node.raw.y", "hi");
out({ step: "client publish", delivered, message: await rawMessage(2) });
const bad = await client.publish("node.*", 1).then(
  () => null,
  (err) => ({ name: err.name, code: err.code })
);
out({ step: "client error", error: bad });

out({ step: "ready" });
const fromPython = await rawMessage(3);
await iterate;
out({ step: "received", raw: fromPython, client: clientMessages, rtt: (await client.ping()) >= 0 });
client.close();
raw.close(1000);
process.exit(0);
