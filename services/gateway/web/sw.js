// The devsilo web app's service worker: it caches the app shell (these static
// files) so the app opens offline and installs as an app. It never touches the
// WebSocket or any other request: session data always comes live from a gateway.

const CACHE = "devsilo-shell-v1";
const SHELL = ["./", "index.html", "app.css", "app.js", "gateway.js", "keys.js", "markdown.js", "review.js",
  "manifest.webmanifest", "icon.svg", "icon-192.png", "icon-512.png"];

self.addEventListener("install", (event) => {
  event.waitUntil(caches.open(CACHE).then((c) => c.addAll(SHELL)).then(() => self.skipWaiting()));
});

self.addEventListener("activate", (event) => {
  event.waitUntil(caches.keys()
    .then((keys) => Promise.all(keys.filter((k) => k !== CACHE).map((k) => caches.delete(k))))
    .then(() => self.clients.claim()));
});

const scope = new URL(self.registration.scope);
const shellUrls = new Set(SHELL.map((p) => new URL(p, scope).href));

self.addEventListener("fetch", (event) => {
  const req = event.request;
  if (req.method !== "GET" || !shellUrls.has(req.url)) return; // not the shell: the network, uncached
  // Network first (a gateway upgrade brings new files), the cache when offline.
  event.respondWith(fetch(req).then((res) => {
    if (res.ok) {
      const copy = res.clone();
      caches.open(CACHE).then((c) => c.put(req, copy));
    }
    return res;
  }).catch(() => caches.match(req)));
});
