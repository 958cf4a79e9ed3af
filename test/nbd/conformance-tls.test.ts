/**
 * The NBD conformance suite (conformance-suite.ts) with TLS as the transport: x509 with client
 * certificates the server checks, and PSK; every option after STARTTLS and every request inside TLS.
 */
import { conformanceSuite } from './conformance-suite.js';

conformanceSuite('x509');
conformanceSuite('psk');
