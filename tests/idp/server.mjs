// Local OpenID provider for Valet's integration tests.
//
// Runs panva's `oidc-provider` (pinned in package.json to 8.8.1: the 8.x line is the
// last that supports Node.js 20 LTS; 9.x wants Node 22 and warns "Unsupported
// runtime" on 20) on 127.0.0.1 only.
//
// Usage:  node tests/idp/server.mjs [PORT]      (or IDP_PORT=PORT; 0 / unset = free port)
//
// stdout carries exactly one line, `READY <issuer>`, once the server is listening
// (everything else, including oidc-provider's own notices, goes to stderr), so a
// harness can read stdout line by line and wait for it. The issuer is
// `http://127.0.0.1:<port>` with no trailing slash, identical to the `issuer` in
// `<issuer>/.well-known/openid-configuration`.
//
// What it serves:
//   * one confidential client: client_id `valet-test`, secret `valet-test-secret`,
//     grant_types [client_credentials], registered with token_endpoint_auth_method
//     client_secret_basic (HTTP Basic). oidc-provider 8.x also accepts
//     client_secret_post (client_id/client_secret form fields) for such a client.
//   * resource indicators (RFC 8707). A token request with `resource=<R>` for a known
//     R yields a JWT access token (`typ: at+jwt`, RS256) whose `aud` is R and whose
//     `scope` is the requested scope intersected with R's scopes. Known resources:
//       https://orders.example/   scopes: orders:read orders:write
//       https://other.example/    scopes: orders:read orders:write other:read
//     (other.example deliberately accepts the orders:* scopes, so a token that differs
//     from a valid orders token only in `aud` can be minted.) Unknown resource =>
//     400 invalid_target. No resource => an opaque (non-JWT) token; always pass one.
//   * key rotation via admin endpoints on the same port (loopback only):
//       POST /__rotate  generate key k<N+1>, put it FIRST in the key set (new tokens
//                       are signed with it) and keep all older keys published.
//       POST /__retire  drop every key but the newest one.
//       GET  /__keys    show the current kids (newest first).
//     Each returns JSON {"kids": [...], "signing_kid": "..."}.
//
// How rotation works: oidc-provider takes its signing keys (`jwks`) only at
// construction and serves them unchanged from its jwks_uri. So every key-set change
// builds a NEW Provider instance with the new key list and the same configuration,
// and the one node:http server (same port, same issuer) simply switches which
// provider's `callback()` it dispatches to. The provider signs with the first RSA
// key matching RS256 in its key set, hence the newest key is kept first. The
// in-memory store is shared by all instances (see SharedMemoryAdapter), though
// nothing in it matters for client_credentials + JWT access tokens.
//
// Env knobs: IDP_PORT (see above), IDP_ACCESS_TOKEN_TTL (seconds, default 300).
// SIGTERM / SIGINT close the server and exit 0.

import * as crypto from 'node:crypto';
import * as http from 'node:http';

// Keep stdout for the READY line only: oidc-provider prints notices with console.info.
console.info = (...args) => console.error(...args);
console.log = (...args) => console.error(...args);

const { default: Provider, errors } = await import('oidc-provider');
// The library's in-memory adapter keeps its store in a module-level LRU, so every
// Provider instance built below shares it. Passing a subclass (rather than leaving
// `adapter` unset) only silences the "development-only in-memory adapter" warning
// that would otherwise be printed at startup and on every key rotation.
// (Deep import: fine because the version is pinned exactly.)
const { default: MemoryAdapter } = await import('oidc-provider/lib/adapters/memory_adapter.js');
class SharedMemoryAdapter extends MemoryAdapter {}

const HOST = '127.0.0.1';
const CLIENT_ID = 'valet-test';
const CLIENT_SECRET = 'valet-test-secret';
const ACCESS_TOKEN_TTL = Number.parseInt(process.env.IDP_ACCESS_TOKEN_TTL ?? '300', 10);
if (!Number.isSafeInteger(ACCESS_TOKEN_TTL) || ACCESS_TOKEN_TTL <= 0) {
  throw new Error(`IDP_ACCESS_TOKEN_TTL must be a positive integer, got ${process.env.IDP_ACCESS_TOKEN_TTL}`);
}

const RESOURCE_SERVERS = {
  'https://orders.example/': { scope: 'orders:read orders:write' },
  'https://other.example/': { scope: 'orders:read orders:write other:read' },
};

const portArg = process.argv[2] ?? process.env.IDP_PORT ?? '0';
const PORT = Number.parseInt(portArg, 10);
if (!Number.isInteger(PORT) || PORT < 0 || PORT > 65535) {
  throw new Error(`invalid port: ${portArg}`);
}

// ---- signing keys -------------------------------------------------------------

let keyCounter = 0;
/** Private RSA JWKs, newest first. keys[0] signs new tokens. */
let keys = [];

function newKey() {
  keyCounter += 1;
  const { privateKey } = crypto.generateKeyPairSync('rsa', { modulusLength: 2048 });
  return {
    ...privateKey.export({ format: 'jwk' }),
    kid: `k${keyCounter}`,
    alg: 'RS256',
    use: 'sig',
  };
}

// ---- provider -----------------------------------------------------------------

function buildProvider(issuer, jwks) {
  const provider = new Provider(issuer, {
    clients: [
      {
        client_id: CLIENT_ID,
        client_secret: CLIENT_SECRET,
        grant_types: ['client_credentials'],
        response_types: [],
        redirect_uris: [],
        token_endpoint_auth_method: 'client_secret_basic',
        scope: 'orders:read orders:write other:read',
      },
    ],
    jwks: { keys: jwks },
    adapter: SharedMemoryAdapter,
    // Fixed, non-secret test value; silences the "cookies.keys" notice.
    cookies: { keys: ['valet-test-idp-cookie-key'] },
    scopes: ['openid', 'orders:read', 'orders:write', 'other:read'],
    features: {
      devInteractions: { enabled: false },
      clientCredentials: { enabled: true },
      resourceIndicators: {
        enabled: true,
        // No default resource: a token request without `resource` gets an opaque
        // token (aud-less, useless to Valet). Tests must send `resource=`.
        defaultResource: async () => undefined,
        // Only consulted for code/refresh/device grants (not used here); keep the
        // library default of requiring an explicit `resource` at the token endpoint.
        useGrantedResource: async () => false,
        getResourceServerInfo: async (_ctx, resourceIndicator) => {
          const rs = RESOURCE_SERVERS[resourceIndicator];
          if (!rs) throw new errors.InvalidTarget();
          return {
            scope: rs.scope,
            audience: resourceIndicator,
            accessTokenTTL: ACCESS_TOKEN_TTL,
            accessTokenFormat: 'jwt',
            jwt: { sign: { alg: 'RS256' } },
          };
        },
      },
    },
    ttl: {
      ClientCredentials: (_ctx, token) => token.resourceServer?.accessTokenTTL ?? ACCESS_TOKEN_TTL,
      AccessToken: (_ctx, token) => token.resourceServer?.accessTokenTTL ?? ACCESS_TOKEN_TTL,
    },
  });
  provider.on('server_error', (_ctx, err) => console.error('idp: server_error', err));
  return { provider, callback: provider.callback() };
}

let issuer;
let current; // { provider, callback }

function publicKeys() {
  return {
    kids: keys.map((k) => k.kid),
    signing_kid: keys[0]?.kid,
  };
}

function swapKeys(newKeys) {
  // Build first, then swap: a throwing constructor leaves the old provider serving.
  const next = buildProvider(issuer, newKeys);
  keys = newKeys;
  current = next;
  console.error(`idp: key set now [${keys.map((k) => k.kid).join(', ')}], signing with ${keys[0].kid}`);
}

// ---- http server ---------------------------------------------------------------

function sendJson(res, status, body) {
  const text = `${JSON.stringify(body)}\n`;
  res.writeHead(status, {
    'content-type': 'application/json',
    'content-length': Buffer.byteLength(text),
    'cache-control': 'no-store',
  });
  res.end(text);
}

function admin(req, res, path) {
  switch (path) {
    case '/__keys':
      if (req.method !== 'GET') return sendJson(res, 405, { error: 'use GET' });
      return sendJson(res, 200, publicKeys());
    case '/__rotate':
      if (req.method !== 'POST') return sendJson(res, 405, { error: 'use POST' });
      swapKeys([newKey(), ...keys]);
      return sendJson(res, 200, publicKeys());
    case '/__retire':
      if (req.method !== 'POST') return sendJson(res, 405, { error: 'use POST' });
      swapKeys(keys.slice(0, 1));
      return sendJson(res, 200, publicKeys());
    default:
      return sendJson(res, 404, { error: 'unknown admin endpoint' });
  }
}

const server = http.createServer((req, res) => {
  const path = (req.url ?? '/').split('?')[0];
  if (path.startsWith('/__')) {
    // Drain any body, then answer.
    req.resume();
    req.on('end', () => {
      try {
        admin(req, res, path);
      } catch (err) {
        console.error('idp: admin error', err);
        sendJson(res, 500, { error: String(err?.message ?? err) });
      }
    });
    return;
  }
  if (!current) {
    sendJson(res, 503, { error: 'starting' });
    return;
  }
  current.callback(req, res);
});

server.on('error', (err) => {
  console.error(`idp: cannot listen on ${HOST}:${PORT}: ${err.message}`);
  process.exit(1);
});

server.listen(PORT, HOST, () => {
  const { port } = server.address();
  issuer = `http://${HOST}:${port}`;
  swapKeys([newKey()]);
  process.stdout.write(`READY ${current.provider.issuer}\n`);
});

let stopping = false;
function shutdown(signal) {
  if (stopping) return;
  stopping = true;
  console.error(`idp: ${signal}, shutting down`);
  server.close(() => process.exit(0));
  server.closeAllConnections();
  setTimeout(() => process.exit(0), 2000).unref();
}
process.on('SIGTERM', () => shutdown('SIGTERM'));
process.on('SIGINT', () => shutdown('SIGINT'));
