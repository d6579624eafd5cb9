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
//   * the JWT client: client_id `valet-test`, secret `valet-test-secret`,
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
//     400 invalid_target. No resource => an opaque (non-JWT) aud-less token.
//   * opaque access tokens (for RFC 7662 introspection): a second client, `valet-opaque`
//     / `valet-opaque-secret` (client_credentials, client_secret_basic), gets OPAQUE
//     tokens for every resource above (same `aud`, same scope rules), so an opaque
//     token and a JWT can differ only in format. The IdP stores opaque tokens; they
//     are not JWTs (43 random base64url chars).
//   * introspection (RFC 7662) at <issuer>/token/introspection, form `token=...`,
//     authenticated as the resource server's client `valet-introspector` /
//     `valet-introspector-secret` (client_secret_basic; client_secret_post works too).
//     A live opaque token => {active: true, scope, aud, iss, exp, iat, client_id, sub,
//     token_type ("Bearer" | "DPoP"), cnf ({jkt} / {"x5t#S256"} when bound)}. `sub` is
//     the client_id (added via extraTokenClaims, matching the `sub` oidc-provider puts
//     in its client_credentials JWTs). Expired / revoked / unknown tokens and JWT
//     access tokens (not stored) => {active: false}. Only the introspector and the
//     token's own client may introspect (allowedPolicy); others get {active: false}.
//   * revocation (RFC 7009) at <issuer>/token/revocation, form `token=...`,
//     authenticated as the client the token was issued to (oidc-provider refuses
//     revocation by any other client: 400 invalid_request "this token does not
//     belong to you"). Answers 200 with an empty body, also for unknown tokens.
//   * DPoP (RFC 9449): a token request carrying a `DPoP: <proof>` header (typ
//     dpop+jwt, ES256 or EdDSA, htm POST, htu <issuer>/token, iat within 300 s, unique
//     jti) gets a sender-constrained token: token_type "DPoP", and `cnf.jkt` (the RFC
//     7638 thumbprint of the proof's jwk) in the JWT payload, or in the introspection
//     response for `valet-opaque` tokens. No nonces. Without the header: Bearer tokens
//     as before. A bad proof (signature, htu, htm, stale iat) => 400
//     invalid_dpop_proof; a replayed one (same jti) => 400 invalid_grant.
//   * mTLS-bound tokens (RFC 8705) without a TLS listener: a third client,
//     `valet-mtls` / `valet-mtls-secret` (client_secret_basic, JWT tokens, registered
//     with tls_client_certificate_bound_access_tokens), must send its "client
//     certificate" in the `x-client-cert` request header as a (URL-encoded or plain)
//     PEM, like a TLS-terminating proxy would; its tokens carry
//     `cnf["x5t#S256"]` = base64url(SHA-256(certificate DER)). No header => 400
//     invalid_grant. (Client authentication stays client_secret_basic: the header is
//     only a binding source, not a credential.)
//   * key rotation via admin endpoints on the same port (loopback only):
//       POST /__rotate  take key k<N+1>, put it FIRST in the key set (new tokens
//                       are signed with it) and keep all older keys published.
//       POST /__retire  drop every key but the newest one.
//       GET  /__keys    show the current kids (newest first).
//     Each returns JSON {"kids": [...], "signing_kid": "..."}.
//     Keys come from the committed test-only pool tests/idp/keys.json (k1 at start,
//     k2, k3... at each rotation; written once by tests/idp/gen-keys.mjs), so no
//     start or rotation spends CPU on RSA key generation; past the pool's end a key
//     is generated. Hence every instance starts with the same k1: tokens of two
//     instances differ by issuer (port), not by key.
//
// How rotation works: oidc-provider takes its signing keys (`jwks`) only at
// construction and serves them unchanged from its jwks_uri. So every key-set change
// builds a NEW Provider instance with the new key list and the same configuration,
// and the one node:http server (same port, same issuer) simply switches which
// provider's `callback()` it dispatches to. The provider signs with the first RSA
// key matching RS256 in its key set, hence the newest key is kept first. The
// in-memory store is shared by all instances (see SharedMemoryAdapter), so opaque
// tokens (and DPoP proof jtis seen) survive a rotation; JWT access tokens are not
// stored at all.
//
//   * introspection accounting and rate limiting, for flood tests:
//       GET  /__stats   {"introspections": N, "rate_limited": M}: requests that reached
//                       the introspection endpoint, and those answered 429.
//     With IDP_INTROSPECTION_RPS=N (N > 0) the introspection endpoint admits N requests
//     a second (a token bucket holding one second's worth) and answers the rest
//     `429 Too Many Requests` with `Retry-After: 1`, as a rate-limiting IdP or gateway
//     would. The token endpoint is never limited.
//
// Env knobs: IDP_PORT (see above), IDP_ACCESS_TOKEN_TTL (seconds, default 300),
// IDP_INTROSPECTION_RPS (see above; unset or 0 = no limit), IDP_EXIT_WITH_STDIN=1
// (exit when stdin reaches end of file: a harness keeps stdin's pipe open, so the
// IdP ends with the harness's process however that ends, even by SIGKILL).
// SIGTERM / SIGINT close the server and exit 0.

import * as crypto from 'node:crypto';
import * as fs from 'node:fs';
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
const OPAQUE_CLIENT_ID = 'valet-opaque';
const OPAQUE_CLIENT_SECRET = 'valet-opaque-secret';
const MTLS_CLIENT_ID = 'valet-mtls';
const MTLS_CLIENT_SECRET = 'valet-mtls-secret';
const INTROSPECTOR_ID = 'valet-introspector';
const INTROSPECTOR_SECRET = 'valet-introspector-secret';
/** Request header carrying the "TLS client certificate" (PEM, URL-encoded or not). */
const CLIENT_CERT_HEADER = 'x-client-cert';
const ALL_SCOPES = 'orders:read orders:write other:read';
const ACCESS_TOKEN_TTL = Number.parseInt(process.env.IDP_ACCESS_TOKEN_TTL ?? '300', 10);
if (!Number.isSafeInteger(ACCESS_TOKEN_TTL) || ACCESS_TOKEN_TTL <= 0) {
  throw new Error(`IDP_ACCESS_TOKEN_TTL must be a positive integer, got ${process.env.IDP_ACCESS_TOKEN_TTL}`);
}

const INTROSPECTION_RPS = Number.parseFloat(process.env.IDP_INTROSPECTION_RPS ?? '0');
if (!Number.isFinite(INTROSPECTION_RPS) || INTROSPECTION_RPS < 0) {
  throw new Error(`IDP_INTROSPECTION_RPS must be a non-negative number, got ${process.env.IDP_INTROSPECTION_RPS}`);
}
const stats = { introspections: 0, rate_limited: 0 };
// Token bucket: one second's worth of requests, refilled continuously.
let bucket = INTROSPECTION_RPS;
let bucketAt = process.hrtime.bigint();
function introspectionAdmitted() {
  if (INTROSPECTION_RPS <= 0) return true;
  const now = process.hrtime.bigint();
  bucket = Math.min(INTROSPECTION_RPS, bucket + (Number(now - bucketAt) / 1e9) * INTROSPECTION_RPS);
  bucketAt = now;
  if (bucket < 1) return false;
  bucket -= 1;
  return true;
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
// Committed test-only keys (tests/idp/keys.json, written by gen-keys.mjs), taken in
// order: generating a 2048-bit RSA key costs ~0.4 cpu-s, at every start and rotation.
// So every instance's k1 (k2...) is the same key; issuers still differ by port.
const KEY_POOL = JSON.parse(fs.readFileSync(new URL('./keys.json', import.meta.url), 'utf8')).keys;

function newKey() {
  keyCounter += 1;
  const kid = `k${keyCounter}`;
  const pooled = KEY_POOL[keyCounter - 1];
  if (pooled) return { ...pooled, kid, alg: 'RS256', use: 'sig' };
  // Beyond the pool (more rotations than keys.json holds): a fresh key.
  const { privateKey } = crypto.generateKeyPairSync('rsa', { modulusLength: 2048 });
  return {
    ...privateKey.export({ format: 'jwk' }),
    kid,
    alg: 'RS256',
    use: 'sig',
  };
}

// ---- provider -----------------------------------------------------------------

function clientCertificate(ctx) {
  const raw = ctx.get(CLIENT_CERT_HEADER);
  if (!raw) return undefined;
  let pem = raw;
  try {
    pem = decodeURIComponent(raw);
  } catch {
    // not URL-encoded: use as is
  }
  return pem;
}

function buildProvider(issuer, jwks) {
  const confidential = (client_id, client_secret, extra = {}) => ({
    client_id,
    client_secret,
    grant_types: ['client_credentials'],
    response_types: [],
    redirect_uris: [],
    token_endpoint_auth_method: 'client_secret_basic',
    scope: ALL_SCOPES,
    ...extra,
  });
  const provider = new Provider(issuer, {
    clients: [
      confidential(CLIENT_ID, CLIENT_SECRET),
      confidential(OPAQUE_CLIENT_ID, OPAQUE_CLIENT_SECRET),
      confidential(MTLS_CLIENT_ID, MTLS_CLIENT_SECRET, {
        tls_client_certificate_bound_access_tokens: true,
      }),
      // The resource server's credentials for the introspection endpoint only: no
      // grant types, so it cannot get tokens itself (400 invalid_request).
      confidential(INTROSPECTOR_ID, INTROSPECTOR_SECRET, { grant_types: [], scope: undefined }),
    ],
    jwks: { keys: jwks },
    adapter: SharedMemoryAdapter,
    // Fixed, non-secret test value; silences the "cookies.keys" notice.
    cookies: { keys: ['valet-test-idp-cookie-key'] },
    scopes: ['openid', 'orders:read', 'orders:write', 'other:read'],
    // Opaque tokens carry no `sub` of their own for client_credentials (there is no
    // account); give them the client_id, as oidc-provider's JWT access tokens do, so
    // introspection and JWT validation yield the same claims. JWTs are unchanged
    // (their payload sets `sub` to the client_id after spreading these extras).
    extraTokenClaims: async (_ctx, token) => (
      token.resourceServer?.accessTokenFormat === 'jwt' ? undefined : { sub: token.clientId }
    ),
    features: {
      devInteractions: { enabled: false },
      clientCredentials: { enabled: true },
      introspection: {
        enabled: true,
        // The library default lets any confidential client introspect any token.
        // Be explicit: the resource server's client, or the token's own client.
        allowedPolicy: async (_ctx, client, token) => (
          client.clientId === INTROSPECTOR_ID || client.clientId === token.clientId
        ),
      },
      revocation: { enabled: true },
      dPoP: {
        enabled: true,
        // No nonceSecret: no server nonces, so a fresh proof (iat within 300 s) with
        // a unique jti is enough (replay detection stays on: allowReplay false).
        requireNonce: () => false,
        allowReplay: false,
      },
      mTLS: {
        enabled: true,
        certificateBoundAccessTokens: true,
        // No TLS listener: the certificate comes from a header, as behind a
        // TLS-terminating proxy. Only used for binding (tls_client_auth is off).
        getCertificate: clientCertificate,
      },
      resourceIndicators: {
        enabled: true,
        // No default resource: a token request without `resource` gets an opaque
        // aud-less token.
        defaultResource: async () => undefined,
        // Only consulted for code/refresh/device grants (not used here); keep the
        // library default of requiring an explicit `resource` at the token endpoint.
        useGrantedResource: async () => false,
        getResourceServerInfo: async (_ctx, resourceIndicator, client) => {
          const rs = RESOURCE_SERVERS[resourceIndicator];
          if (!rs) throw new errors.InvalidTarget();
          if (client?.clientId === OPAQUE_CLIENT_ID) {
            return {
              scope: rs.scope,
              audience: resourceIndicator,
              accessTokenTTL: ACCESS_TOKEN_TTL,
              accessTokenFormat: 'opaque',
            };
          }
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
    case '/__stats':
      if (req.method !== 'GET') return sendJson(res, 405, { error: 'use GET' });
      return sendJson(res, 200, stats);
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
  if (path === '/token/introspection') {
    stats.introspections += 1;
    if (!introspectionAdmitted()) {
      stats.rate_limited += 1;
      req.resume();
      res.setHeader('retry-after', '1');
      sendJson(res, 429, { error: 'rate_limited' });
      return;
    }
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
if (process.env.IDP_EXIT_WITH_STDIN === '1') {
  process.stdin.on('end', () => shutdown('stdin closed'));
  process.stdin.on('error', () => shutdown('stdin error'));
  process.stdin.resume();
}
