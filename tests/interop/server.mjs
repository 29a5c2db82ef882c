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
//
// On start it prints exactly one line to stdout, `READY <json>`; all logging goes to stderr.
//
// Key rotation (chosen design): the signing keys live in the Provider's constructor options,
// and oidc-provider has no API to swap them, so `POST /__control/rotate` builds a *new*
// Provider instance with freshly generated keys (new kids) and swaps the request handler the
// HTTPS server dispatches to. Requests already running finish on the old instance. Opaque
// tokens survive the swap because the built-in memory adapter keeps its storage at module
// level (shared by every instance in this process); JWTs signed by the old keys stop verifying
// against the new JWKS, unless `?retain=1` is given, in which case the previous public keys
// stay published after the new ones (the new keys come first, so they are the ones used to sign).
// The control endpoint sits on the same HTTPS listener (loopback only, no client cert needed).

import { readFileSync } from 'node:fs';
import * as crypto from 'node:crypto';
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

function newSigningKeys() {
  generation += 1;
  const tag = `${generation}-${crypto.randomBytes(4).toString('hex')}`;
  const jwk = (keyPair, alg, kid) => ({
    ...keyPair.privateKey.export({ format: 'jwk' }), kid, alg, use: 'sig',
  });
  return [
    jwk(crypto.generateKeyPairSync('rsa', { modulusLength: 2048 }), 'RS256', `rs256-${tag}`),
    jwk(crypto.generateKeyPairSync('ec', { namedCurve: 'P-256' }), 'ES256', `es256-${tag}`),
  ];
}

function publicOnly({ d, p, q, dp, dq, qi, ...pub }) {
  return pub;
}

// ---- mutual TLS ---------------------------------------------------------------------------

// RFC 4514 string of a certificate subject. Node prints the subject one RDN per line, most
// significant first, already escaped per RFC 2253 (e.g. "O=mtls-gateway test\nCN=client-a");
// RFC 4514 lists the RDNs in reverse order, comma-separated ("CN=client-a,O=mtls-gateway test"),
// which is what Python's `x509.Name.rfc4514_string()` gives. Multi-valued RDNs and attributes
// without an RFC 4514 short name (e.g. emailAddress) are out of scope for these tests.
function rfc4514(subject) {
  return subject.split('\n').reverse().join(',');
}

const mTLS = {
  enabled: true,
  certificateBoundAccessTokens: true,
  tlsClientAuth: true,
  selfSignedTlsClientAuth: true,
  // The peer certificate of this very TLS connection (undefined if none was sent). An
  // X509Certificate is accepted by oidc-provider wherever it computes x5t#S256.
  getCertificate(ctx) {
    return ctx.socket.getPeerX509Certificate?.();
  },
  // rejectUnauthorized is false (self-signed certificates must reach the provider), so the
  // chain verdict against ca_bundle is only recorded here; tls_client_auth relies on it.
  certificateAuthorized(ctx) {
    return ctx.socket.authorized === true;
  },
  // oidc-provider compares nothing itself: it hands us the registered tls_client_auth_* value.
  certificateSubjectMatches(ctx, property, expected) {
    const cert = ctx.socket.getPeerX509Certificate?.();
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

// ---- provider -----------------------------------------------------------------------------

function buildProvider(issuer, keys) {
  const provider = new Provider(issuer, {
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

function kids(list) {
  return Object.fromEntries(list.filter((k) => k.d).map((k) => [k.alg, k.kid]));
}

function rotate(retain) {
  const previous = keys.map(publicOnly);
  const fresh = newSigningKeys();
  // New keys first: oidc-provider signs with the first key matching the algorithm.
  keys = retain ? [...fresh, ...previous] : fresh;
  handler = buildProvider(issuer, keys).callback();
  return { kids: kids(fresh), jwks_kids: keys.map((k) => k.kid) };
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
  return send(200, rotate(retain));
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

server.listen(config.port ?? 0, HOST, () => {
  const { port } = server.address();
  issuer = config.issuer || `https://${HOST}:${port}`;
  handler = buildProvider(issuer, keys).callback();
  const url = (path) => `${issuer}${path}`;
  process.stdout.write(`READY ${JSON.stringify({
    port,
    issuer,
    token_endpoint: url(ROUTES.token),
    introspection_endpoint: url(ROUTES.introspection),
    revocation_endpoint: url(ROUTES.revocation),
    jwks_uri: url(ROUTES.jwks),
    rotate_url: url(CONTROL_ROTATE),
    kids: kids(keys),
  })}\n`);
});

if (config.exit_on_stdin_close) {
  process.stdin.on('end', () => process.exit(0));
  process.stdin.on('error', () => process.exit(0));
  process.stdin.resume();
}
