// Client keys and known gateways, kept in IndexedDB.
//
// A key pair is made with WebCrypto as non-extractable Ed25519, or ECDSA
// P-256 where the browser lacks Ed25519. The private key never leaves the
// browser: IndexedDB stores the CryptoKey object itself, which cannot be
// exported. Each gateway gets its own key.

const DB_NAME = "devsilo";
const STORE = "gateways";

function openDb() {
  return new Promise((resolve, reject) => {
    const req = indexedDB.open(DB_NAME, 1);
    req.onupgradeneeded = () => req.result.createObjectStore(STORE, { keyPath: "id" });
    req.onsuccess = () => resolve(req.result);
    req.onerror = () => reject(req.error);
  });
}

async function tx(mode, fn) {
  const db = await openDb();
  return new Promise((resolve, reject) => {
    const t = db.transaction(STORE, mode);
    const req = fn(t.objectStore(STORE));
    t.oncomplete = () => { db.close(); resolve(req ? req.result : undefined); };
    t.onerror = () => { db.close(); reject(t.error); };
  });
}

/** Every gateway this browser paired with. */
export function listGateways() { return tx("readonly", (s) => s.getAll()); }
/** Remember (or update) one gateway record. */
export function saveGateway(gw) { return tx("readwrite", (s) => s.put(gw)); }
/** Forget one gateway and its key. */
export function deleteGateway(id) { return tx("readwrite", (s) => s.delete(id)); }

export function b64encode(bytes) {
  let s = "";
  const u = new Uint8Array(bytes);
  for (let i = 0; i < u.length; i += 0x8000) s += String.fromCharCode(...u.subarray(i, i + 0x8000));
  return btoa(s);
}

export function b64decode(text) {
  const s = atob(text);
  const out = new Uint8Array(s.length);
  for (let i = 0; i < s.length; i++) out[i] = s.charCodeAt(i);
  return out;
}

/** A new non-extractable key pair: {keyType, privateKey, publicKey (raw, base64)}. */
export async function makeKeyPair(prefer = "ed25519") {
  if (prefer === "ed25519") {
    try {
      const kp = await crypto.subtle.generateKey({ name: "Ed25519" }, false, ["sign", "verify"]);
      const raw = await crypto.subtle.exportKey("raw", kp.publicKey);
      return { keyType: "ed25519", privateKey: kp.privateKey, publicKey: b64encode(raw) };
    } catch (err) {
      if (!(err instanceof DOMException) || err.name !== "NotSupportedError") throw err;
    }
  }
  const kp = await crypto.subtle.generateKey({ name: "ECDSA", namedCurve: "P-256" }, false, ["sign", "verify"]);
  const raw = await crypto.subtle.exportKey("raw", kp.publicKey);
  return { keyType: "ecdsa-p256", privateKey: kp.privateKey, publicKey: b64encode(raw) };
}

const CONTEXT = new TextEncoder().encode("devsilo-gateway-challenge-v1");

/** What a client signs: context, NUL, the pinned certificate's SHA-256, the 32-byte nonce. */
export function challengeMessage(fingerprint, nonce) {
  const hex = fingerprint.replaceAll(":", "");
  if (!/^[0-9a-fA-F]{64}$/.test(hex) || nonce.length !== 32) {
    throw new Error("a challenge binds a 32-byte SHA-256 fingerprint and a 32-byte nonce");
  }
  const out = new Uint8Array(CONTEXT.length + 1 + 32 + 32);
  out.set(CONTEXT, 0);
  out[CONTEXT.length] = 0;
  for (let i = 0; i < 32; i++) out[CONTEXT.length + 1 + i] = parseInt(hex.substr(i * 2, 2), 16);
  out.set(nonce, CONTEXT.length + 33);
  return out;
}

/** The signature (base64) of the challenge; P-256 signs SHA-256 in r||s form, as the gateway expects. */
export async function signChallenge(keyType, privateKey, fingerprint, nonce) {
  const msg = challengeMessage(fingerprint, nonce);
  const alg = keyType === "ed25519" ? { name: "Ed25519" } : { name: "ECDSA", hash: "SHA-256" };
  return b64encode(await crypto.subtle.sign(alg, privateKey, msg));
}

/** Hex SHA-256 of bytes. */
export async function sha256hex(bytes) {
  const d = new Uint8Array(await crypto.subtle.digest("SHA-256", bytes));
  return Array.from(d, (b) => b.toString(16).padStart(2, "0")).join("");
}
