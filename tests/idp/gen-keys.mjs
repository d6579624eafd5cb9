// Writes tests/idp/keys.json: the pool of RSA signing keys tests/idp/server.mjs takes
// its keys from (k1 at start, k2, k3... at each POST /__rotate), so that no IdP start
// or rotation spends CPU generating a 2048-bit RSA key (~0.4 cpu-s each, 12+ times a
// test run). TEST FIXTURES ONLY: these private keys are public in this repository
// and sign nothing but the test IdP's tokens on 127.0.0.1.
//
// Usage:  node tests/idp/gen-keys.mjs [COUNT]   (default 4; rewrites keys.json)
// Run once; rerun only to change the pool's size (every key changes then).

import * as crypto from 'node:crypto';
import * as fs from 'node:fs';

const count = Number.parseInt(process.argv[2] ?? '4', 10);
if (!Number.isInteger(count) || count < 1) throw new Error(`bad count: ${process.argv[2]}`);

const keys = Array.from({ length: count }, (_, i) => {
  const { privateKey } = crypto.generateKeyPairSync('rsa', { modulusLength: 2048 });
  return { ...privateKey.export({ format: 'jwk' }), kid: `k${i + 1}`, alg: 'RS256', use: 'sig' };
});
const file = {
  _comment: 'TEST FIXTURES ONLY, public: private RSA keys of the test IdP (tests/idp/server.mjs), '
    + 'used in order (k1 at start, then one per /__rotate). Written by tests/idp/gen-keys.mjs.',
  keys,
};
const out = new URL('./keys.json', import.meta.url);
fs.writeFileSync(out, `${JSON.stringify(file, null, 2)}\n`);
console.error(`gen-keys: wrote ${keys.length} keys to ${out.pathname}`);
