// One gateway connection: hello, the signed challenge, requests and replies,
// session events, and reconnecting with backoff (resuming from the last seq).

import { b64decode, makeKeyPair, signChallenge } from "./keys.js";

export const PROTOCOL_VERSION = 1;
const BACKOFF_MIN_MS = 1000;
const BACKOFF_MAX_MS = 30000;
const REPLY_TIMEOUT_MS = 120000; // create_session may wait 90 s for a sandbox
const REPLIES = {
  list_sessions: ["sessions"],
  create_session: ["session_created"],
  access_report: ["access_report"],
  cost: ["cost"],
  upload_file: ["upload_ready"],
  upload_chunk: ["upload_progress", "upload_done"],
  workspace: ["workspace_result", "workspace_upload_needed"],
  pairing_code: ["pairing_code"],
  ping: ["pong"],
};

/** The WebSocket URL of the gateway that serves this page. */
export function sameOriginUrl() {
  return `wss://${location.host}/ws`;
}

function openSocket(url) {
  return new Promise((resolve, reject) => {
    let ws;
    try {
      ws = new WebSocket(url);
    } catch (err) {
      reject(err);
      return;
    }
    const frames = [];
    const waiting = [];
    ws.onmessage = (ev) => {
      let frame;
      try {
        frame = JSON.parse(ev.data);
      } catch {
        return;
      }
      const w = waiting.shift();
      if (w) w.resolve(frame); else frames.push(frame);
    };
    ws.onclose = () => { for (const w of waiting.splice(0)) w.reject(new Error("the gateway closed the connection")); };
    ws.onerror = () => reject(new Error(`cannot connect to ${url}; if it uses a self-signed certificate, ` +
      `open its https:// address once and accept the certificate (compare its SHA-256 fingerprint)`));
    ws.onopen = () => resolve({
      ws,
      next: () => (frames.length ? Promise.resolve(frames.shift())
        : new Promise((res, rej) => waiting.push({ resolve: res, reject: rej }))),
      detach: () => frames.splice(0),
    });
  });
}

async function expect(sock, type) {
  const frame = await sock.next();
  if (frame.type === type) return frame;
  throw new Error(frame.message || `the gateway sent ${frame.type} where ${type} belongs`);
}

async function greet(sock) {
  const hello = await expect(sock, "hello");
  if (!(hello.versions || []).includes(PROTOCOL_VERSION)) {
    throw new Error(`the gateway speaks protocol ${hello.versions}; this app speaks ${PROTOCOL_VERSION}`);
  }
  const challenge = await expect(sock, "challenge");
  return { hello, nonce: b64decode(challenge.nonce) };
}

/**
 * Pair with a gateway by code: make a key pair, register it, sign the next challenge.
 * Resolves to the gateway record to keep (the private key stays a non-extractable CryptoKey).
 */
export async function pair(url, code, clientName, prefer = "ed25519") {
  const sock = await openSocket(url);
  try {
    const { hello } = await greet(sock);
    if (!/^[0-9a-fA-F:]{64,95}$/.test(hello.fingerprint || "")) {
      throw new Error("this gateway does not say its certificate fingerprint; pair with the command line");
    }
    const key = await makeKeyPair(prefer);
    sock.ws.send(JSON.stringify({ type: "pair", v: PROTOCOL_VERSION, code: code.trim().toUpperCase(),
      public_key: key.publicKey, key_type: key.keyType, client_name: clientName }));
    const paired = await expect(sock, "paired");
    const nonce = b64decode((await expect(sock, "challenge")).nonce);
    const signature = await signChallenge(key.keyType, key.privateKey, hello.fingerprint, nonce);
    sock.ws.send(JSON.stringify({ type: "authenticate", v: PROTOCOL_VERSION, method: "key",
      key_id: paired.key_id, signature, client_name: clientName }));
    const ok = await expect(sock, "auth_ok");
    return { id: url, url, fingerprint: hello.fingerprint, gateway: hello.gateway, keyId: paired.key_id,
      keyType: key.keyType, privateKey: key.privateKey, publicKey: key.publicKey, user: ok.user,
      operator: ok.operator, clientName, pairedAt: Date.now() };
  } finally {
    sock.ws.close();
  }
}

/**
 * A lasting connection to one paired gateway.
 *
 * Events: "state" (detail: {state, message}), "frame" (every non-reply frame),
 * "event" (detail: a session event, in seq order, each once).
 */
export class GatewayConnection extends EventTarget {
  constructor(record) {
    super();
    this.record = record;
    this.state = "offline";
    this.ws = null;
    this.backoff = BACKOFF_MIN_MS;
    this.pending = new Map(); // request type -> [{replies, resolve, reject}]
    this.follow = new Map(); // session id -> next seq wanted
    this.closed = false;
    this.timer = null;
  }

  setState(state, message = "") {
    this.state = state;
    this.dispatchEvent(new CustomEvent("state", { detail: { state, message } }));
  }

  /** Connect (and keep reconnecting with backoff until close()). */
  async start() {
    this.closed = false;
    clearTimeout(this.timer);
    this.setState("connecting");
    let sock;
    try {
      sock = await openSocket(this.record.url);
      const { hello, nonce } = await greet(sock);
      const pinned = this.record.fingerprint.replaceAll(":", "").toLowerCase();
      if (hello.fingerprint && hello.fingerprint.replaceAll(":", "").toLowerCase() !== pinned) {
        sock.ws.close();
        this.closed = true;
        this.setState("refused", `the gateway's certificate changed (was ${pinned.slice(0, 16)}…, now ` +
          `${hello.fingerprint.slice(0, 16)}…); pair again if you trust it`);
        return;
      }
      const signature = await signChallenge(this.record.keyType, this.record.privateKey, pinned, nonce);
      sock.ws.send(JSON.stringify({ type: "authenticate", v: PROTOCOL_VERSION, method: "key",
        key_id: this.record.keyId, signature, client_name: this.record.clientName }));
      const ok = await sock.next();
      if (ok.type !== "auth_ok") {
        sock.ws.close();
        if (ok.code === "revoked" || ok.code === "auth_failed") {
          this.closed = true;
          this.setState("refused", ok.message || "the gateway refused this key");
          return;
        }
        throw new Error(ok.message || `the gateway sent ${ok.type}`);
      }
    } catch (err) {
      if (sock) sock.ws.close();
      this.retry(err.message);
      return;
    }
    this.ws = sock.ws;
    this.backoff = BACKOFF_MIN_MS;
    for (const f of sock.detach()) this.onFrame(f);
    this.ws.onmessage = (ev) => {
      let frame;
      try {
        frame = JSON.parse(ev.data);
      } catch {
        return;
      }
      this.onFrame(frame);
    };
    this.ws.onclose = () => {
      this.ws = null;
      this.failPending("the connection to the gateway closed");
      if (!this.closed) this.retry("connection lost");
    };
    this.setState("online");
    for (const [sid, seq] of this.follow) this.send({ type: "attach", session_id: sid, from_seq: seq, batch: 100 });
  }

  retry(message) {
    if (this.closed) return;
    const wait = this.backoff;
    this.backoff = Math.min(this.backoff * 2, BACKOFF_MAX_MS);
    this.setState("offline", `${message}; retrying in ${Math.round(wait / 1000)} s`);
    this.timer = setTimeout(() => this.start(), wait);
  }

  /** Close for good (no reconnect). */
  close() {
    this.closed = true;
    clearTimeout(this.timer);
    if (this.ws) this.ws.close();
  }

  failPending(message) {
    for (const list of this.pending.values()) for (const w of list.splice(0)) w.reject(new Error(message));
  }

  send(frame) {
    if (!this.ws || this.ws.readyState !== WebSocket.OPEN) throw new Error("not connected to the gateway");
    this.ws.send(JSON.stringify(frame));
  }

  /** Send a request and resolve with its reply (or reject with the gateway's error). */
  call(frame) {
    const replies = REPLIES[frame.type];
    return new Promise((resolve, reject) => {
      try {
        this.send(frame);
      } catch (err) {
        reject(err);
        return;
      }
      if (!replies) {
        resolve(null);
        return;
      }
      if (!this.pending.has(frame.type)) this.pending.set(frame.type, []);
      const list = this.pending.get(frame.type);
      const w = { replies, resolve, reject };
      w.timer = setTimeout(() => {
        const i = list.indexOf(w);
        if (i >= 0) list.splice(i, 1);
        reject(new Error(`the gateway did not answer ${frame.type}`));
      }, REPLY_TIMEOUT_MS);
      const done = (fn) => (v) => { clearTimeout(w.timer); fn(v); };
      w.resolve = done(resolve);
      w.reject = done(reject);
      list.push(w);
    });
  }

  /** Follow a session's events from seq (again after every reconnect, from the last seq seen). */
  attach(sid, fromSeq = 0) {
    if (!this.follow.has(sid)) this.follow.set(sid, fromSeq);
    if (this.state === "online") this.send({ type: "attach", session_id: sid, from_seq: this.follow.get(sid), batch: 100 });
  }

  onFrame(frame) {
    if (frame.type === "event") {
      this.onEvent(frame);
      return;
    }
    if (frame.type === "events") {
      for (const e of frame.events || []) this.onEvent(e);
      return;
    }
    if ((frame.type === "error" || frame.type === "overloaded") && frame.request && this.pending.get(frame.request)?.length) {
      const w = this.pending.get(frame.request).shift();
      const err = new Error(frame.message);
      err.code = frame.code;
      w.reject(err);
      return;
    }
    for (const list of this.pending.values()) {
      const i = list.findIndex((w) => w.replies.includes(frame.type));
      if (i >= 0) {
        const [w] = list.splice(i, 1);
        w.resolve(frame);
        return;
      }
    }
    this.dispatchEvent(new CustomEvent("frame", { detail: frame }));
  }

  onEvent(ev) {
    const want = this.follow.get(ev.session_id);
    if (want === undefined || ev.seq < want) return; // a duplicate after a resume
    if (ev.seq > want) { // a gap (this client was dropped for reading slowly): fetch what is missing
      this.send({ type: "request_events", session_id: ev.session_id, from_seq: want });
      return;
    }
    this.follow.set(ev.session_id, ev.seq + 1);
    this.dispatchEvent(new CustomEvent("event", { detail: ev }));
  }
}
