// A real OAuth 2.0 authorization server (node-oidc-provider) for the interop tests.
//
// Usage: node server.mjs CONFIG.json
//
// Everything comes from the JSON file written by tests/interop/oidc_server.py:
//   port                      0 picks a free port
//   server_cert, server_key   PEM paths of the TLS server certificate
//   ca_bundle                 PEM path: trust anchor for tls_client_auth
//   issuer                    null/absent -> https://127.0.0.1:<port>
//   clients                   oidc-provider client metadata (snake_case), used as is
//   introspection_client_id   the one client (the gateway) allowed to introspect/revoke any token
//   resources                 { "<resource URI>": { format: "jwt"|"opaque", alg?, scope, ttl? } }
//   default_resource          used when a token request names no resource
//   exit_on_stdin_close       exit when stdin closes, so a crashed parent leaves no orphan
//   client_cert_header_listener  also listen on plain HTTP (loopback) for a gateway in front of
//                             the token endpoint: there the client certificate is the RFC 9440
//                             Client-Cert header the gateway sets (see "mutual TLS" below)
//
// On start it prints exactly one line to stdout, `READY <json>`; all logging goes to stderr.
//
// Key rotation (chosen design): the signing keys live in the Provider's constructor options,
// and oidc-provider has no API to swap them, so `POST /__control/rotate` builds a *new*
// Provider instance with freshly generated keys (new kids) and swaps the request handler the
// HTTPS server dispatches to. Requests already running finish on the old instance. Opaque
// tokens (and revocations) survive the swap because every instance uses one SharedStore
// adapter (the built-in memory adapter keeps a store per instance). JWTs signed by the old keys
// stop verifying against the new JWKS, unless `?retain=1` is given: then the previous keys stay
// in the keystore, hence in the JWKS, after the new ones (oidc-provider only accepts private
// keys in `jwks`, and signs with the first key that fits the algorithm, so new keys go first).
// The control endpoint sits on the same HTTPS listener (loopback only, no client cert needed).

import { readFileSync } from 'node:fs';
import * as crypto from 'node:crypto';
import * as http from 'node:http';
import * as https from 'node:https';
import Provider, { errors } from 'oidc-provider';

const config = JSON.parse(readFileSync(process.argv[2], 'utf8'));
const HOST = '127.0.0.1'; // never anything else: these tests use loopback only

// Fixed routes, so that the READY line can announce them without a discovery round trip.
const ROUTES = {
  token: '/token',
  introspection: '/token/introspection',
  revocation: '/token/revocation',
  jwks: '/jwks',
};
const CONTROL_ROTATE = '/__control/rotate';

// ---- signing keys -------------------------------------------------------------------------

let generation = 0;

// The keys are JWK-encoded *by generateKeyPairSync itself* (privateKeyEncoding format 'jwk'),
// never with `keyPair.privateKey.export({ format: 'jwk' })`. On Node.js 20 the latter can
// deadlock the whole process: the JWK export holds the key's mutex while it allocates JS
// strings, an allocation may start a garbage collection, and that collection may finalise the
// (already unreachable) key-generation job of that very key, whose destructor takes the same
// non-recursive mutex. The main thread then waits on itself forever (seen with gdb:
// ExportJWKEcKey -> Heap::CollectGarbage -> ~KeyGenJob<EcKeyGenTraits> -> pthread_mutex_lock),
// so the READY line never came (30 s start-up timeout) or a rotation request never answered.
// Encoding inside the job runs while the job is still referenced, so it cannot be finalised.
const JWK_ENCODING = { publicKeyEncoding: { format: 'jwk' }, privateKeyEncoding: { format: 'jwk' } };

function newSigningKeys() {
  generation += 1;
  const tag = `${generation}-${crypto.randomBytes(4).toString('hex')}`;
  const jwk = (type, options, alg, kid) => ({
    ...crypto.generateKeyPairSync(type, { ...options, ...JWK_ENCODING }).privateKey,
    kid,
    alg,
    use: 'sig',
  });
  return [
    jwk('rsa', { modulusLength: 2048 }, 'RS256', `rs256-${tag}`),
    jwk('ec', { namedCurve: 'P-256' }, 'ES256', `es256-${tag}`),
  ];
}

// ---- mutual TLS ---------------------------------------------------------------------------

// RFC 4514 string of a certificate subject. Node prints the subject one RDN per line, most
// significant first, already escaped per RFC 2253 (e.g. "O=mtls-gateway test\nCN=client-a");
// RFC 4514 lists the RDNs in reverse order, comma-separated ("CN=client-a,O=mtls-gateway test"),
// which is what Python's `x509.Name.rfc4514_string()` gives, escapes included (checked with
// , + " ; \ < > # and leading/trailing spaces, and UTF-8). Compared exactly, no case folding.
// Multi-valued RDNs and attributes without an RFC 4514 short name (emailAddress) may differ.
function rfc4514(subject) {
  return subject.split('\n').reverse().join(',');
}

// Behind a gateway (client_cert_header_listener): requests on the plain-HTTP loopback listener
// come only from the gateway, which terminated the client's mutual TLS, authenticated it and
// put the verified certificate in `Client-Cert: :<base64 DER>:` (RFC 9440). The header is
// read only there; on the TLS listener the certificate of the connection counts, as before.
const caCerts = [];
for (const pem of readFileSync(config.ca_bundle, 'utf8').split(/(?<=-----END CERTIFICATE-----)/)) {
  if (pem.includes('BEGIN CERTIFICATE')) caCerts.push(new crypto.X509Certificate(pem.trim()));
}

function headerCertificate(ctx) {
  const match = /^:([A-Za-z0-9+/]+={0,2}):$/.exec((ctx.get('client-cert') || '').trim());
  if (!match) return undefined;
  try {
    return new crypto.X509Certificate(Buffer.from(match[1], 'base64'));
  } catch {
    return undefined;
  }
}

function peerCertificate(ctx) {
  if (!ctx.socket.encrypted) {
    return config.client_cert_header_listener ? headerCertificate(ctx) : undefined;
  }
  return ctx.socket.getPeerX509Certificate?.();
}

const mTLS = {
  enabled: true,
  certificateBoundAccessTokens: true,
  tlsClientAuth: true,
  selfSignedTlsClientAuth: true,
  // The peer certificate of this very TLS connection (undefined if none was sent), or the
  // gateway's Client-Cert header on the header listener. An X509Certificate is accepted by
  // oidc-provider wherever it computes x5t#S256.
  getCertificate(ctx) {
    return peerCertificate(ctx);
  },
  // rejectUnauthorized is false (self-signed certificates must reach the provider), so the
  // chain verdict against ca_bundle is only recorded here; tls_client_auth relies on it.
  // A header certificate is checked against ca_bundle here (signature and issuer name).
  certificateAuthorized(ctx) {
    if (!ctx.socket.encrypted) {
      const cert = peerCertificate(ctx);
      return Boolean(cert) && caCerts.some((ca) => cert.checkIssued(ca) && cert.verify(ca.publicKey));
    }
    return ctx.socket.authorized === true;
  },
  // oidc-provider compares nothing itself: it hands us the registered tls_client_auth_* value.
  certificateSubjectMatches(ctx, property, expected) {
    const cert = peerCertificate(ctx);
    if (!cert) return false;
    switch (property) {
      case 'tls_client_auth_subject_dn':
        return rfc4514(cert.subject) === expected;
      case 'tls_client_auth_san_dns':
        return (cert.subjectAltName ?? '').split(', ').includes(`DNS:${expected}`);
      default:
        return false; // other SAN kinds are not used by these tests
    }
  },
};

// ---- resources ----------------------------------------------------------------------------

async function getResourceServerInfo(ctx, resourceIndicator) {
  const rs = config.resources[resourceIndicator];
  if (!rs) throw new errors.InvalidTarget(`unknown resource ${resourceIndicator}`);
  return {
    scope: rs.scope,
    audience: resourceIndicator, // the token's aud is exactly the resource URI
    accessTokenTTL: rs.ttl ?? 300,
    accessTokenFormat: rs.format,
    ...(rs.format === 'jwt' ? { jwt: { sign: { alg: rs.alg } } } : {}),
  };
}

// ---- policies -----------------------------------------------------------------------------

// The gateway (introspection client) may introspect and revoke any client's token; every other
// client only its own. Returning false yields `active: false` / a silent 200, as the RFCs want.
const ownerOrGateway = async (ctx, client, token) => (
  client.clientId === config.introspection_client_id || client.clientId === token.clientId
);

// ---- token store --------------------------------------------------------------------------

// A minimal oidc-provider adapter over one process-wide Map, shared by all Provider instances
// (see key rotation above). Expired entries are dropped when read; a test AS issues few tokens.
const store = new Map(); // "Model:id" -> { payload, expiresAt (ms) }

class SharedStore {
  constructor(model) {
    this.model = model;
  }

  key(id) {
    return `${this.model}:${id}`;
  }

  async upsert(id, payload, expiresIn) {
    const expiresAt = expiresIn ? Date.now() + expiresIn * 1000 : Infinity;
    store.set(this.key(id), { payload, expiresAt });
  }

  async find(id) {
    const entry = store.get(this.key(id));
    if (entry && entry.expiresAt <= Date.now()) store.delete(this.key(id));
    return entry && entry.expiresAt > Date.now() ? entry.payload : undefined;
  }

  async #findBy(field, value) {
    for (const [key, { payload }] of store) {
      if (key.startsWith(`${this.model}:`) && payload[field] === value) {
        return this.find(key.slice(this.model.length + 1));
      }
    }
    return undefined;
  }

  findByUid(uid) {
    return this.#findBy('uid', uid);
  }

  findByUserCode(userCode) {
    return this.#findBy('userCode', userCode);
  }

  async consume(id) {
    const entry = store.get(this.key(id));
    if (entry) entry.payload.consumed = Math.floor(Date.now() / 1000);
  }

  async destroy(id) {
    store.delete(this.key(id));
  }

  async revokeByGrantId(grantId) {
    for (const [key, { payload }] of store) {
      if (payload.grantId === grantId) store.delete(key);
    }
  }
}

// ---- provider -----------------------------------------------------------------------------

function buildProvider(issuer, keys) {
  const provider = new Provider(issuer, {
    adapter: SharedStore,
    clients: config.clients,
    jwks: { keys },
    routes: ROUTES,
    // Enabling mTLS is not enough: the methods must be listed here too.
    clientAuthMethods: ['client_secret_basic', 'tls_client_auth', 'self_signed_tls_client_auth'],
    cookies: { keys: [crypto.randomBytes(32).toString('hex')] },
    features: {
      devInteractions: { enabled: false }, // no browser flows here
      clientCredentials: { enabled: true },
      introspection: { enabled: true, allowedPolicy: ownerOrGateway },
      revocation: { enabled: true, allowedPolicy: ownerOrGateway },
      mTLS,
      resourceIndicators: {
        enabled: true,
        defaultResource: async (ctx, client, oneOf) => oneOf ?? config.default_resource,
        getResourceServerInfo,
        useGrantedResource: async () => true,
      },
    },
  });
  provider.on('server_error', (ctx, err) => console.error('server_error', err));
  provider.on('grant.error', (ctx, err) => console.error('grant.error', err.message, err.error_description ?? ''));
  return provider;
}

// ---- HTTPS listener -----------------------------------------------------------------------

let handler = (req, res) => { res.writeHead(503).end(); }; // replaced once the issuer is known
let keys = newSigningKeys();
let issuer;

// alg -> kid of the keys that sign (the first one of each algorithm).
function signingKids(list) {
  const out = {};
  for (const { alg, kid } of list) out[alg] ??= kid;
  return out;
}

function rotate(retain) {
  const fresh = newSigningKeys();
  const next = retain ? [...fresh, ...keys] : fresh; // new keys first: they sign
  handler = buildProvider(issuer, next).callback(); // throws before the swap if invalid
  keys = next;
  return { kids: signingKids(keys), jwks_kids: keys.map((k) => k.kid) };
}

function control(req, res) {
  const send = (status, body) => {
    res.writeHead(status, { 'content-type': 'application/json' }).end(JSON.stringify(body));
  };
  const url = new URL(req.url, issuer);
  if (!['127.0.0.1', '::1', '::ffff:127.0.0.1'].includes(req.socket.remoteAddress)) {
    return send(403, { error: 'loopback only' });
  }
  if (req.method !== 'POST') return send(405, { error: 'POST only' });
  const retain = ['1', 'true'].includes(url.searchParams.get('retain'));
  try {
    return send(200, rotate(retain));
  } catch (err) {
    console.error('rotation failed', err);
    return send(500, { error: String(err) });
  }
}

const server = https.createServer({
  cert: readFileSync(config.server_cert),
  key: readFileSync(config.server_key),
  ca: readFileSync(config.ca_bundle),
  requestCert: true, // ask every client for a certificate ...
  rejectUnauthorized: false, // ... but let the provider judge it (self-signed ones included)
}, (req, res) => {
  if (req.url.split('?')[0] === CONTROL_ROTATE) return control(req, res);
  return handler(req, res);
});

// The gateway's listener (client_cert_header_listener): plain HTTP on loopback, same provider.
// GET /__control/seen answers how many other requests it has served (tests assert that a
// request the gateway refused never got here).
let headerListenerSeen = 0;
const headerListener = config.client_cert_header_listener
  ? http.createServer((req, res) => {
    if (req.url === '/__control/seen') {
      res.writeHead(200, { 'content-type': 'application/json' });
      return res.end(JSON.stringify({ seen: headerListenerSeen }));
    }
    headerListenerSeen += 1;
    return handler(req, res);
  })
  : null;

function announce(port, headerPort) {
  issuer = config.issuer || `https://${HOST}:${port}`;
  handler = buildProvider(issuer, keys).callback();
  const url = (path) => `${issuer}${path}`;
  process.stdout.write(`READY ${JSON.stringify({
    header_listener_url: headerPort ? `http://${HOST}:${headerPort}` : null,
    port,
    issuer,
    token_endpoint: url(ROUTES.token),
    introspection_endpoint: url(ROUTES.introspection),
    revocation_endpoint: url(ROUTES.revocation),
    jwks_uri: url(ROUTES.jwks),
    rotate_url: url(CONTROL_ROTATE),
    kids: signingKids(keys),
  })}\n`);
}

server.listen(config.port ?? 0, HOST, () => {
  const { port } = server.address();
  if (!headerListener) return announce(port, null);
  return headerListener.listen(0, HOST, () => announce(port, headerListener.address().port));
});

if (config.exit_on_stdin_close) {
  process.stdin.on('end', () => process.exit(0));
  process.stdin.on('error', () => process.exit(0));
  process.stdin.resume();
}
