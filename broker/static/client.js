/**
 * broker-client.js: a dependency-free ES module client for the broker's wire protocol v1 (JSON).
 *
 * Served by the broker at GET /client.js; the same file is clients/js/broker-client.js. It runs in
 * browsers (`<script type="module">`) and in Node >= 19 given a WebSocket implementation such as
 * the `ws` package (`new BrokerClient(url, { WebSocket })`).
 *
 * Theory of operation. One WebSocket at a time. Requests carry an integer id and wait for the ack
 * or error with that id (or time out). When the socket closes the waiting requests fail with
 * ConnectionLostError, the client waits a capped exponential backoff with jitter and reconnects;
 * on every (re)connection it re-subscribes each pattern it holds, and only once the broker has
 * acknowledged all of them does it report "connected" (so a message published after that reaches
 * it). Unlike the Python clients, the first connection retries too: a page usually outlives a
 * broker restart, and may well be opened before the broker is up.
 *
 * Events (EventTarget, detail in `event.detail`):
 *   "state"   {state, previous, error, delay, attempt}   state: idle|connecting|connected|reconnecting|closed
 *   "message" {topic, data, seq}                         every delivery, whatever the subscription
 *   "error"   BrokerError                                 error replies nobody waits for
 */

export const JSON_SUBPROTOCOL = "pubsub.v1.json";

/** The broker answered {"op":"error"}; `code` is the protocol's error code (bad_request, ...). */
export class BrokerError extends Error {
  constructor(code, message, id = null) {
    super(message ? `${code}: ${message}` : code);
    this.name = "BrokerError";
    this.code = code;
    this.brokerMessage = message;
    this.id = id;
  }
}

/** The connection dropped while a request waited for its answer, or for good. */
export class ConnectionLostError extends Error {
  constructor(message) {
    super(message);
    this.name = "ConnectionLostError";
  }
}

/** No answer within the request timeout (the client may have been reconnecting). */
export class RequestTimeoutError extends Error {
  constructor(message) {
    super(message);
    this.name = "RequestTimeoutError";
  }
}

/** The client was closed. */
export class ClientClosedError extends Error {
  constructor(message = "the client is closed") {
    super(message);
    this.name = "ClientClosedError";
  }
}

/** ws(s)://<this page's host>/ws, or the broker's default address outside a browser. */
export function defaultUrl() {
  if (typeof location !== "undefined" && /^https?:$/.test(location.protocol)) {
    const url = new URL("/ws", location.href);
    url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
    return url.href;
  }
  return "ws://127.0.0.1:8765/ws";
}

/** Whether a concrete topic matches a pattern: `*` is one token, a final `>` one or more. */
export function topicMatches(pattern, topic) {
  const want = pattern.split(".");
  const have = topic.split(".");
  for (let i = 0; i < want.length; i++) {
    if (want[i] === ">" && i === want.length - 1) return have.length > i;
    if (i >= have.length || (want[i] !== "*" && want[i] !== have[i])) return false;
  }
  return want.length === have.length;
}

function base64ToBytes(text) {
  const bin = atob(text);
  const bytes = new Uint8Array(bin.length);
  for (let i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
  return bytes;
}

/** One subscribe(): messages go to its callback, or wait for `for await (const m of sub)`. */
export class Subscription {
  constructor(client, topic, callback) {
    this.topic = topic;
    this.ended = false;
    this._client = client;
    this._callback = callback || null;
    this._queue = [];
    this._waiters = [];
    this._error = null;
  }

  _deliver(message) {
    if (this.ended) return;
    if (this._callback) {
      try {
        this._callback(message);
      } catch (err) {
        console.error("broker-client: message callback failed", err);
      }
      return;
    }
    const waiter = this._waiters.shift();
    if (waiter) waiter.resolve({ value: message, done: false });
    else this._queue.push(message);
  }

  _end(error = null) {
    if (this.ended) return;
    this.ended = true;
    this._error = error;
    for (const waiter of this._waiters.splice(0)) {
      if (error) waiter.reject(error);
      else waiter.resolve({ value: undefined, done: true });
    }
  }

  /** The next message (a Promise); rejects once the subscription ended with an error. */
  next() {
    if (this._queue.length) return Promise.resolve({ value: this._queue.shift(), done: false });
    if (this.ended) {
      return this._error ? Promise.reject(this._error) : Promise.resolve({ value: undefined, done: true });
    }
    return new Promise((resolve, reject) => this._waiters.push({ resolve, reject }));
  }

  [Symbol.asyncIterator]() {
    return this;
  }

  async return() {
    await this.unsubscribe();
    return { value: undefined, done: true };
  }

  unsubscribe() {
    return this._client._unsubscribe(this);
  }
}

export class BrokerClient extends EventTarget {
  /**
   * @param {string} [url] ws:// or wss:// URL of the broker's /ws endpoint (default: this page's host)
   * @param {object} [options]
   *   reconnect (true), minDelay (100 ms), maxDelay (5000 ms), factor (2), jitter (0.5: each delay
   *   is scaled by a random factor in [1 - jitter, 1]), requestTimeout (10000 ms),
   *   WebSocket (globalThis.WebSocket; pass the `ws` package's class in Node)
   */
  constructor(url = defaultUrl(), options = {}) {
    super();
    this.url = url;
    this.options = {
      reconnect: true,
      minDelay: 100,
      maxDelay: 5000,
      factor: 2,
      jitter: 0.5,
      requestTimeout: 10000,
      WebSocket: globalThis.WebSocket,
      ...options,
    };
    if (!this.options.WebSocket) throw new TypeError("no WebSocket implementation: pass options.WebSocket");
    this._state = "idle";
    this._ws = null;
    this._nextId = 1;
    this._pending = new Map(); // id -> {resolve, reject, timer}
    this._subs = new Map(); // pattern -> [Subscription]
    this._resubscribing = new Map(); // id -> pattern, for the subscribes sent on (re)connection
    this._readyWaiters = [];
    this._attempt = 0;
    this._timer = null;
    this._closing = false;
    this._finalError = null;
  }

  get state() {
    return this._state;
  }

  /** Patterns this client holds at the broker. */
  get subscriptions() {
    return [...this._subs.keys()];
  }

  /** Connect (retrying with backoff when `reconnect` is on); resolves once connected. */
  connect() {
    if (this._state === "idle") this._open();
    return this._whenReady(Infinity).then(() => this);
  }

  close() {
    this._closing = true;
    clearTimeout(this._timer);
    const ws = this._ws;
    this._ws = null;
    if (ws) ws.close(1000);
    this._finish(null);
  }

  /** Publish; resolves to the delivered count (ack) or null once sent with {ack: false}. */
  async publish(topic, data, { ack = true } = {}) {
    if (!ack) {
      const ws = await this._whenReady(this.options.requestTimeout);
      ws.send(JSON.stringify({ op: "publish", topic, data }));
      return null;
    }
    const reply = await this._request({ op: "publish", topic, data });
    return typeof reply.delivered === "number" ? reply.delivered : null;
  }

  /** Subscribe to a topic or pattern; resolves to a Subscription once the broker acks. */
  async subscribe(topic, callback = null) {
    const sub = new Subscription(this, topic, callback);
    await this._whenReady(this.options.requestTimeout);
    const subs = this._subs.get(topic);
    if (subs) {
      subs.push(sub);
      return sub;
    }
    this._subs.set(topic, [sub]);
    try {
      await this._request({ op: "subscribe", topic });
    } catch (err) {
      const group = this._subs.get(topic) || [];
      this._subs.delete(topic);
      for (const other of group) if (other !== sub) other._end(err);
      sub.ended = true;
      throw err;
    }
    return sub;
  }

  /** Drop every local subscription to `topic` and the broker's. */
  async unsubscribe(topic) {
    for (const sub of this._subs.get(topic) || []) sub._end(null);
    this._subs.delete(topic);
    await this._request({ op: "unsubscribe", topic });
  }

  /** Round trip through the broker, in milliseconds. */
  async ping() {
    const start = performance.now();
    await this._request({ op: "ping" });
    return performance.now() - start;
  }

  // internals

  async _unsubscribe(sub) {
    sub._end(null);
    const group = this._subs.get(sub.topic);
    if (!group || !group.includes(sub)) return;
    group.splice(group.indexOf(sub), 1);
    if (group.length) return;
    this._subs.delete(sub.topic);
    if (this._state !== "connected") return; // the next connection simply will not re-subscribe
    try {
      await this._request({ op: "unsubscribe", topic: sub.topic });
    } catch (err) {
      if (!(err instanceof ConnectionLostError || err instanceof ClientClosedError)) throw err;
    }
  }

  _setState(state, extra = {}) {
    const previous = this._state;
    this._state = state;
    const detail = { state, previous, error: null, delay: null, attempt: 0, ...extra };
    this.dispatchEvent(new CustomEvent("state", { detail }));
    if (state === "connected" || state === "closed") {
      for (const waiter of this._readyWaiters.splice(0)) waiter();
    }
  }

  _whenReady(timeout) {
    return new Promise((resolve, reject) => {
      const check = () => {
        if (this._state === "connected" && this._ws) resolve(this._ws);
        else if (this._state === "closed") reject(this._finalError || new ClientClosedError());
        else if (this._state === "idle") reject(new Error("call connect() first"));
        else return false;
        return true;
      };
      if (check()) return;
      let timer = null;
      const waiter = () => {
        clearTimeout(timer);
        if (!check()) this._readyWaiters.push(waiter);
      };
      if (Number.isFinite(timeout)) {
        timer = setTimeout(() => {
          const i = this._readyWaiters.indexOf(waiter);
          if (i >= 0) this._readyWaiters.splice(i, 1);
          reject(new RequestTimeoutError(`not connected within ${timeout} ms (${this._state})`));
        }, timeout);
      }
      this._readyWaiters.push(waiter);
    });
  }

  async _request(body) {
    const ws = await this._whenReady(this.options.requestTimeout);
    const id = this._nextId++;
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this._pending.delete(id);
        reject(new RequestTimeoutError(`${body.op}: no answer within ${this.options.requestTimeout} ms`));
      }, this.options.requestTimeout);
      this._pending.set(id, { resolve, reject, timer });
      try {
        ws.send(JSON.stringify({ ...body, id }));
      } catch (err) {
        clearTimeout(timer);
        this._pending.delete(id);
        reject(new ConnectionLostError(`send failed: ${err.message}`));
      }
    });
  }

  _open() {
    this._setState("connecting", { attempt: this._attempt });
    let ws;
    try {
      ws = new this.options.WebSocket(this.url, [JSON_SUBPROTOCOL]);
    } catch (err) {
      this._finalError = err; // a malformed URL: retrying cannot help
      this._finish(err);
      return;
    }
    this._ws = ws;
    ws.binaryType = "arraybuffer";
    ws.onopen = () => {
      if (ws !== this._ws) return;
      this._attempt = 0;
      this._resubscribing.clear();
      for (const topic of this._subs.keys()) {
        const id = this._nextId++;
        this._resubscribing.set(id, topic);
        ws.send(JSON.stringify({ op: "subscribe", topic, id }));
      }
      if (!this._resubscribing.size) this._setState("connected");
    };
    ws.onmessage = (event) => {
      if (ws === this._ws) this._receive(event.data);
    };
    ws.onerror = () => {}; // a close event always follows, with the code
    ws.onclose = (event) => {
      if (ws !== this._ws) return;
      this._ws = null;
      const why = event.code === 1006 ? "connection failed or dropped" : `closed ${event.code} ${event.reason || ""}`.trim();
      this._lost(new ConnectionLostError(why));
    };
  }

  _receive(data) {
    let msg;
    try {
      if (typeof data !== "string") data = new TextDecoder().decode(data);
      msg = JSON.parse(data);
    } catch (err) {
      this.dispatchEvent(new CustomEvent("error", { detail: new Error(`undecodable frame: ${err.message}`) }));
      return;
    }
    if (msg.op === "message") {
      const data = msg.encoding === "base64" ? base64ToBytes(msg.data) : msg.data;
      const message = { topic: msg.topic, data, seq: msg.seq };
      this.dispatchEvent(new CustomEvent("message", { detail: message }));
      for (const [pattern, subs] of this._subs) {
        if (topicMatches(pattern, message.topic)) for (const sub of [...subs]) sub._deliver(message);
      }
      return;
    }
    const id = msg.id;
    if (this._resubscribing.has(id)) {
      const pattern = this._resubscribing.get(id);
      this._resubscribing.delete(id);
      if (msg.op === "error") {
        // The broker refused a pattern it accepted before: end those subscriptions with the reason.
        const err = new BrokerError(msg.code, msg.message, id);
        for (const sub of this._subs.get(pattern) || []) sub._end(err);
        this._subs.delete(pattern);
        this.dispatchEvent(new CustomEvent("error", { detail: err }));
      }
      if (!this._resubscribing.size && this._state !== "connected") this._setState("connected");
      return;
    }
    const pending = this._pending.get(id);
    if (pending) {
      this._pending.delete(id);
      clearTimeout(pending.timer);
      if (msg.op === "error") pending.reject(new BrokerError(msg.code, msg.message, id));
      else pending.resolve(msg);
    } else if (msg.op === "error") {
      this.dispatchEvent(new CustomEvent("error", { detail: new BrokerError(msg.code, msg.message, id ?? null) }));
    }
  }

  _failPending(error) {
    for (const { reject, timer } of this._pending.values()) {
      clearTimeout(timer);
      reject(error);
    }
    this._pending.clear();
    this._resubscribing.clear();
  }

  _lost(error) {
    this._failPending(error);
    if (this._closing || this._state === "closed") return;
    if (!this.options.reconnect) {
      this._finalError = error;
      this._finish(error);
      return;
    }
    const { minDelay, maxDelay, factor, jitter } = this.options;
    const delay = Math.min(maxDelay, minDelay * factor ** this._attempt) * (1 - jitter * Math.random());
    this._attempt += 1;
    this._setState("reconnecting", { error, delay, attempt: this._attempt });
    this._timer = setTimeout(() => this._open(), delay);
  }

  _finish(error) {
    if (this._state === "closed") return;
    this._failPending(error || new ClientClosedError());
    for (const subs of this._subs.values()) for (const sub of subs) sub._end(error);
    this._subs.clear();
    this._setState("closed", { error });
  }
}
