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
 * Tokens. A browser cannot set headers on a WebSocket, so the token travels as `?token=` on the
 * URL. `options.token` is a string or a function (maybe async) returning one; a function is called
 * before every connection attempt and again shortly before the token's `exp` (read from the JWT
 * payload, never verified here), and the fresh token is handed over with the `auth` op, so the
 * connection outlives its first token. A refused upgrade reaches a browser only as close 1006
 * before "open" (the HTTP status is hidden from scripts), so every attempt that fails before
 * opening is reported as a ConnectionRefusedError "error" event, with `.status` when the runtime
 * exposes it (Node's `ws` does) and null in browsers. Close 4001 (the token expired) raises a
 * "tokenexpired" event; with a token function the client reconnects with a fresh token, with a
 * fixed string it closes for good (the same token cannot succeed again).
 *
 * Recovery. For each concrete topic it subscribes to, the client keeps the stream position
 * (epoch, seq) from the subscribe ack and from every message. On a reconnection it re-subscribes
 * concrete topics first, each with `since`, and wildcard patterns after them: a recovered topic's
 * replay then starts before any wildcard is live again on the new socket, so a message can never
 * arrive twice (once live via a wildcard, once replayed). A subscription that could not be
 * recovered (the broker restarted, the gap outgrew the retention window, or it is a wildcard,
 * which has no position) raises one "unrecovered" event: the application must reload its state.
 *
 * Events (EventTarget, detail in `event.detail`):
 *   "state"        {state, previous, error, delay, attempt}  idle|connecting|connected|reconnecting|closed
 *   "message"      {topic, data, seq}                        every delivery, whatever the subscription
 *   "error"        Error                                     error replies nobody waits for, refused
 *                                                            connections, failed token refreshes
 *   "tokenexpired" {error, reconnect}                        the broker closed with 4001
 *   "recovered"    {topic, since, epoch, seq}                replay of since.seq+1..seq follows
 *   "unrecovered"  {topic, reason, since, epoch, seq}        reason: epoch|window|wildcard|position
 */

export const JSON_SUBPROTOCOL = "pubsub.v1.json";

/** Close code the broker uses when the connection's token expired. */
export const CLOSE_TOKEN_EXPIRED = 4001;

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

/** Error code `forbidden`: the token does not allow this publish, subscribe or history request. */
export class ForbiddenError extends BrokerError {
  constructor(message, id = null) {
    super("forbidden", message, id);
    this.name = "ForbiddenError";
  }
}

/** Error code `unauthorized`: the broker refused a token sent with the `auth` op. */
export class UnauthorizedError extends BrokerError {
  constructor(message, id = null) {
    super("unauthorized", message, id);
    this.name = "UnauthorizedError";
  }
}

/** The BrokerError subclass for an error reply's code. */
export function brokerError(code, message, id = null) {
  if (code === "forbidden") return new ForbiddenError(message, id);
  if (code === "unauthorized") return new UnauthorizedError(message, id);
  return new BrokerError(code, message, id);
}

/** The connection dropped while a request waited for its answer, or for good. */
export class ConnectionLostError extends Error {
  constructor(message) {
    super(message);
    this.name = "ConnectionLostError";
  }
}

/**
 * The WebSocket closed before it opened: the broker is down, or it refused the upgrade (401 for a
 * missing or invalid token, 403 for the Origin, 429/503 for the per-IP limits). `status` is the
 * HTTP status when the runtime tells (Node's `ws`), null in browsers, which hide it.
 */
export class ConnectionRefusedError extends ConnectionLostError {
  constructor(message, { status = null, tokenSent = false } = {}) {
    super(message);
    this.name = "ConnectionRefusedError";
    this.status = status;
    this.tokenSent = tokenSent;
  }
}

/** The broker closed the connection with 4001: its token expired. */
export class TokenExpiredError extends ConnectionLostError {
  constructor(message = "token expired") {
    super(message);
    this.name = "TokenExpiredError";
    this.code = CLOSE_TOKEN_EXPIRED;
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

/** Whether a pattern names one topic (no `*` or `>` token): only those have stream positions. */
export function isConcrete(pattern) {
  return !pattern.split(".").some((token) => token === "*" || token === ">");
}

/**
 * The claims of a JWT (its middle part, base64url JSON), or null when it is not one. Nothing is
 * verified: the client only reads `exp` (and `iat`) to know when to refresh.
 */
export function tokenClaims(token) {
  if (typeof token !== "string") return null;
  const parts = token.split(".");
  if (parts.length !== 3) return null;
  try {
    const b64 = parts[1].replace(/-/g, "+").replace(/_/g, "/");
    const bytes = base64ToBytes(b64 + "=".repeat((4 - (b64.length % 4)) % 4));
    const claims = JSON.parse(new TextDecoder().decode(bytes));
    return claims && typeof claims === "object" ? claims : null;
  } catch {
    return null;
  }
}

function base64ToBytes(text) {
  const bin = atob(text);
  const bytes = new Uint8Array(bin.length);
  for (let i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
  return bytes;
}

function decodeData(entry) {
  return entry.encoding === "base64" ? base64ToBytes(entry.data) : entry.data;
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

  /** {epoch, seq} of the last message seen on this concrete topic; null for a wildcard. */
  get position() {
    const pos = this._client._positions.get(this.topic);
    return pos ? { ...pos } : null;
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
   *   token (null; a string, or a function, maybe async, returning one: sent as `?token=`),
   *   refreshMargin (30000 ms: refresh that long before `exp`, at most a third of the lifetime left),
   *   reconnect (true), minDelay (100 ms), maxDelay (5000 ms), factor (2), jitter (0.5: each delay
   *   is scaled by a random factor in [1 - jitter, 1]), requestTimeout (10000 ms),
   *   WebSocket (globalThis.WebSocket; pass the `ws` package's class in Node)
   */
  constructor(url = defaultUrl(), options = {}) {
    super();
    this.url = url;
    this.options = {
      token: null,
      refreshMargin: 30000,
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
    this._positions = new Map(); // concrete topic -> {epoch, seq}
    this._resubscribing = new Map(); // id -> {topic, since}, for the subscribes sent on (re)connection
    this._readyWaiters = [];
    this._attempt = 0;
    this._opening = 0; // generation of the current connection attempt
    this._timer = null;
    this._refreshTimer = null;
    this._token = null; // the token of the current connection (string), if any
    this._tokenAt = 0; // Date.now() when it was obtained
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
    clearTimeout(this._refreshTimer);
    const ws = this._ws;
    this._ws = null;
    if (ws) ws.close(1000);
    this._finish(null);
  }

  /**
   * Replace the token (string or function). Connected: it is sent at once with the `auth` op
   * (resolves to the revoked patterns). Connecting or waiting to reconnect: a new attempt starts now.
   */
  async setToken(token) {
    this.options.token = token;
    if (this._state === "connected") return this._refresh();
    if (this._state === "reconnecting" || this._state === "connecting") {
      // Do not wait for an attempt made with the old token to fail: start one with the new.
      clearTimeout(this._timer);
      const ws = this._ws;
      this._ws = null; // its events are ignored from now on
      if (ws) ws.close();
      this._failPending(new ConnectionLostError("token replaced while connecting"));
      this._open();
    }
    return [];
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
      // The position is taken from the ack as it is read, before any message behind it.
      await this._request({ op: "subscribe", topic }, (ack) => this._setPosition(topic, ack));
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
    this._positions.delete(topic);
    await this._request({ op: "unsubscribe", topic });
  }

  /**
   * The retained messages of a concrete topic: {epoch, seq, recovered, messages: [{topic, seq,
   * data}]}. `since` ({epoch, seq}, e.g. a Subscription's `position`) asks for what followed it
   * (`recovered` true); without it, or when that is gone (`recovered` false), the oldest retained
   * message comes first. At most `limit` messages.
   */
  async history(topic, { since = null, limit = null } = {}) {
    const body = { op: "history", topic };
    if (since) body.since = { epoch: since.epoch, seq: since.seq };
    if (limit !== null && limit !== undefined) body.limit = limit;
    const reply = await this._request(body);
    const messages = (reply.messages || []).map((m) => ({ topic, seq: m.seq, data: decodeData(m) }));
    return { epoch: reply.epoch, seq: reply.seq, recovered: reply.recovered, messages };
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
    this._positions.delete(sub.topic);
    if (this._state !== "connected") return; // the next connection simply will not re-subscribe
    try {
      await this._request({ op: "unsubscribe", topic: sub.topic });
    } catch (err) {
      if (!(err instanceof ConnectionLostError || err instanceof ClientClosedError)) throw err;
    }
  }

  _setPosition(topic, ack) {
    if (isConcrete(topic) && typeof ack.epoch === "string" && typeof ack.seq === "number") {
      this._positions.set(topic, { epoch: ack.epoch, seq: ack.seq });
    } else {
      this._positions.delete(topic);
    }
  }

  _emit(type, detail) {
    this.dispatchEvent(new CustomEvent(type, { detail }));
  }

  _setState(state, extra = {}) {
    const previous = this._state;
    this._state = state;
    this._emit("state", { state, previous, error: null, delay: null, attempt: 0, ...extra });
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

  /** Send `body` with a fresh id; resolves to the ack. `onAck` runs as the ack is read. */
  async _request(body, onAck = null) {
    const ws = await this._whenReady(this.options.requestTimeout);
    return this._send(ws, body, onAck);
  }

  _send(ws, body, onAck = null) {
    const id = this._nextId++;
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this._pending.delete(id);
        reject(new RequestTimeoutError(`${body.op}: no answer within ${this.options.requestTimeout} ms`));
      }, this.options.requestTimeout);
      this._pending.set(id, { resolve, reject, timer, onAck });
      try {
        ws.send(JSON.stringify({ ...body, id }));
      } catch (err) {
        clearTimeout(timer);
        this._pending.delete(id);
        reject(new ConnectionLostError(`send failed: ${err.message}`));
      }
    });
  }

  /** The token to use now: the option itself, or what its function returns (bounded in time). */
  async _fetchToken() {
    const source = this.options.token;
    if (typeof source !== "function") return source ?? null;
    let timer = null;
    const timeout = new Promise((_, reject) => {
      timer = setTimeout(
        () => reject(new Error(`token function: no answer within ${this.options.requestTimeout} ms`)),
        this.options.requestTimeout,
      );
    });
    try {
      const token = await Promise.race([Promise.resolve().then(() => source()), timeout]);
      return token ?? null;
    } finally {
      clearTimeout(timer);
    }
  }

  async _open() {
    const generation = ++this._opening;
    this._setState("connecting", { attempt: this._attempt });
    let token;
    try {
      token = await this._fetchToken();
    } catch (err) {
      if (generation !== this._opening || this._closing) return;
      this._emit("error", err);
      this._lost(err);
      return;
    }
    if (generation !== this._opening || this._closing) return;
    let ws;
    try {
      const url = new URL(this.url);
      if (token) url.searchParams.set("token", token);
      ws = new this.options.WebSocket(url.href, [JSON_SUBPROTOCOL]);
    } catch (err) {
      this._finalError = err; // a malformed URL: retrying cannot help
      this._finish(err);
      return;
    }
    this._ws = ws;
    this._token = token;
    this._tokenAt = Date.now();
    let opened = false;
    let failure = null; // what the runtime said in the error event, if anything
    ws.binaryType = "arraybuffer";
    ws.onopen = () => {
      if (ws !== this._ws) return;
      opened = true;
      this._attempt = 0;
      this._scheduleRefresh();
      this._resubscribe(ws);
    };
    ws.onmessage = (event) => {
      if (ws === this._ws) this._receive(event.data);
    };
    // A close event always follows, with the code; Node's `ws` puts the refusal's status here.
    ws.onerror = (event) => {
      failure = (event && (event.message || (event.error && event.error.message))) || null;
    };
    ws.onclose = (event) => {
      if (ws !== this._ws) return;
      this._ws = null;
      clearTimeout(this._refreshTimer);
      if (!opened) {
        const err = refusal(failure, Boolean(token));
        this._emit("error", err);
        this._lost(err);
      } else if (event.code === CLOSE_TOKEN_EXPIRED) {
        const err = new TokenExpiredError(`closed ${event.code} ${event.reason || "token expired"}`);
        const reconnect = typeof this.options.token === "function" && this.options.reconnect;
        this._emit("tokenexpired", { error: err, reconnect });
        if (reconnect) this._lost(err);
        else if (!this._closing) {
          this._finalError = err;
          this._finish(err);
        }
      } else {
        const why = event.code === 1006 ? "connection dropped" : `closed ${event.code} ${event.reason || ""}`.trim();
        this._lost(new ConnectionLostError(why));
      }
    };
  }

  /** Subscribe again to every pattern held: concrete topics first (with `since`), then wildcards. */
  _resubscribe(ws) {
    this._resubscribing.clear();
    const topics = [...this._subs.keys()];
    const ordered = [...topics.filter(isConcrete), ...topics.filter((t) => !isConcrete(t))];
    for (const topic of ordered) {
      const id = this._nextId++;
      const since = this._positions.get(topic) || null;
      const body = { op: "subscribe", topic, id };
      if (since) body.since = { ...since };
      this._resubscribing.set(id, { topic, since });
      ws.send(JSON.stringify(body));
    }
    if (!this._resubscribing.size) this._setState("connected");
  }

  _resubscribed(msg, { topic, since }) {
    if (msg.op === "error") {
      // The broker refused a pattern it accepted before: end those subscriptions with the reason.
      const err = brokerError(msg.code, msg.message, msg.id);
      for (const sub of this._subs.get(topic) || []) sub._end(err);
      this._subs.delete(topic);
      this._positions.delete(topic);
      this._emit("error", err);
      return;
    }
    const epoch = typeof msg.epoch === "string" ? msg.epoch : null;
    const seq = typeof msg.seq === "number" ? msg.seq : null;
    if (since && msg.recovered === true) {
      // The replay (since.seq + 1 .. seq) follows; each message moves the position on.
      this._positions.set(topic, { epoch, seq: since.seq });
      this._emit("recovered", { topic, since, epoch, seq });
      return;
    }
    this._setPosition(topic, msg);
    let reason;
    if (!isConcrete(topic)) reason = "wildcard";
    else if (!since || epoch === null) reason = "position"; // no position to resume from
    else if (epoch !== since.epoch) reason = "epoch"; // the stream started over: broker restart
    else reason = "window"; // the missed messages are no longer retained
    this._emit("unrecovered", { topic, reason, since, epoch, seq });
  }

  _scheduleRefresh() {
    clearTimeout(this._refreshTimer);
    if (typeof this.options.token !== "function") return;
    const left = this._tokenLeft();
    if (left === null) return;
    const margin = Math.min(this.options.refreshMargin, Math.max(0, left) / 3);
    this._refreshTimer = setTimeout(() => this._refresh().catch(() => {}), Math.max(0, left - margin));
  }

  /**
   * Milliseconds the current token has left, or null without `exp`. With `iat` the lifetime is
   * also measured from when the client got the token: for a token minted just before it was
   * handed over, a local clock running behind cannot make the refresh late.
   */
  _tokenLeft() {
    const claims = tokenClaims(this._token);
    if (!claims || typeof claims.exp !== "number") return null;
    const now = Date.now();
    let left = claims.exp * 1000 - now;
    if (typeof claims.iat === "number") {
      left = Math.min(left, (claims.exp - claims.iat) * 1000 - (now - this._tokenAt));
    }
    return left;
  }

  /** Get a fresh token and hand it over with the `auth` op; resolves to the revoked patterns. */
  async _refresh() {
    clearTimeout(this._refreshTimer);
    const ws = this._ws;
    if (!ws || this._state !== "connected") return [];
    let token;
    try {
      token = await this._fetchToken();
    } catch (err) {
      this._emit("error", err);
      this._retryRefresh();
      return [];
    }
    if (ws !== this._ws) return [];
    if (!token || token === this._token) {
      this._retryRefresh(); // nothing new yet: ask again later, until the broker closes with 4001
      return [];
    }
    let ack;
    try {
      ack = await this._send(ws, { op: "auth", token });
    } catch (err) {
      if (err instanceof BrokerError) {
        this._emit("error", err);
        if (ws === this._ws) this._retryRefresh();
      }
      return [];
    }
    if (ws !== this._ws) return [];
    this._token = token;
    this._tokenAt = Date.now();
    this._scheduleRefresh();
    const revoked = Array.isArray(ack.revoked) ? ack.revoked : [];
    for (const pattern of revoked) {
      const err = new ForbiddenError(`the new token does not allow ${pattern}: subscription removed`);
      for (const sub of this._subs.get(pattern) || []) sub._end(err);
      this._subs.delete(pattern);
      this._positions.delete(pattern);
      this._emit("error", err);
    }
    return revoked;
  }

  _retryRefresh() {
    clearTimeout(this._refreshTimer);
    const left = this._tokenLeft();
    if (left === null || left <= 0) return; // expired: the broker closes with 4001, we reconnect
    this._refreshTimer = setTimeout(() => this._refresh().catch(() => {}), Math.max(1000, left / 2));
  }

  _receive(data) {
    let msg;
    try {
      if (typeof data !== "string") data = new TextDecoder().decode(data);
      msg = JSON.parse(data);
    } catch (err) {
      this._emit("error", new Error(`undecodable frame: ${err.message}`));
      return;
    }
    if (msg.op === "message") {
      const message = { topic: msg.topic, data: decodeData(msg), seq: msg.seq };
      const pos = this._positions.get(message.topic);
      if (pos && typeof message.seq === "number") pos.seq = message.seq;
      this._emit("message", message);
      for (const [pattern, subs] of this._subs) {
        if (topicMatches(pattern, message.topic)) for (const sub of [...subs]) sub._deliver(message);
      }
      return;
    }
    const id = msg.id;
    if (this._resubscribing.has(id)) {
      const entry = this._resubscribing.get(id);
      this._resubscribing.delete(id);
      this._resubscribed(msg, entry);
      if (!this._resubscribing.size && this._state !== "connected") this._setState("connected");
      return;
    }
    const pending = this._pending.get(id);
    if (pending) {
      this._pending.delete(id);
      clearTimeout(pending.timer);
      if (msg.op === "error") {
        pending.reject(brokerError(msg.code, msg.message, id));
      } else {
        if (pending.onAck) pending.onAck(msg);
        pending.resolve(msg);
      }
    } else if (msg.op === "error") {
      this._emit("error", brokerError(msg.code, msg.message, id ?? null));
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
    clearTimeout(this._refreshTimer);
    this._opening += 1; // an attempt still waiting for its token gives up
    this._failPending(error || new ClientClosedError());
    for (const subs of this._subs.values()) for (const sub of subs) sub._end(error);
    this._subs.clear();
    this._positions.clear();
    this._setState("closed", { error });
  }
}

/** The error for a WebSocket that closed before it opened. */
function refusal(failure, tokenSent) {
  const match = /Unexpected server response: (\d{3})/.exec(failure || "");
  const status = match ? Number(match[1]) : null;
  let message;
  if (status === 401) message = "connection refused: 401 (missing, invalid or expired token)";
  else if (status !== null) message = `connection refused: HTTP ${status}`;
  else if (tokenSent) message = "connection refused (check token): broker down or upgrade refused";
  else message = "connection refused: broker down or upgrade refused";
  return new ConnectionRefusedError(message, { status, tokenSent });
}
