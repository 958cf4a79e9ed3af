/** The NBD conformance suite (conformance-suite.ts) in clear; over TLS: conformance-tls.test.ts. */
import { conformanceSuite } from './conformance-suite.js';

conformanceSuite('plain');
