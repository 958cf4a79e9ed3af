/**
 * The pure server handshake (src/nbd/server-handshake.ts): every row of the option table in
 * every TLS phase, as a table of (phase, option) → the replies and the decision, with no socket.
 */
import { describe, expect, it } from 'vitest';
import { MemoryNode } from '../../src/block/memory.js';
import { completeNode } from '../../src/block/node.js';
import { FLAG_C_FIXED_NEWSTYLE, FLAG_C_NO_ZEROES, OPT, REP } from '../../src/nbd/constants.js';
import { Export } from '../../src/nbd/export.js';
import { OPTIONS, ServerHandshake, type HandshakeHost, type HandshakeStep, type OptionExtension, type TlsMode } from '../../src/nbd/server-handshake.js';
import { infoPayload, metaPayload } from '../support/raw-client.js';

const LINK = 0x4c0;

function host(accepted: string[], shuttingDown = false): HandshakeHost {
  const exp = new Export({ name: 'disk', description: 'the disk', node: completeNode(new MemoryNode(4096)) });
  const link: OptionExtension = {
    name: 'link',
    accept: (data) => {
      accepted.push(data.toString());
      return 'refused by the test';
    },
  };
  return {
    shuttingDown,
    findExport: (name) => (name === 'disk' ? exp : undefined),
    listExports: () => [exp],
    optionExtension: (o) => (o === LINK ? link : undefined),
  };
}

/** a handshake past the client flags, in the TLS phase asked for ('tls': STARTTLS done) */
function handshake(phase: 'no-tls' | 'tls-offered' | 'tls-required' | 'tls', accepted: string[] = []): ServerHandshake {
  const mode: TlsMode | undefined = phase === 'no-tls' ? undefined : phase === 'tls-offered' ? 'on' : 'require';
  const hs = new ServerHandshake(host(accepted), { tls: mode, peer: 'test' });
  hs.clientFlags(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);
  if (phase === 'tls') {
    expect(hs.option(OPT.STARTTLS, Buffer.alloc(0)).decision.kind).toBe('starttls');
    hs.tlsUp();
  }
  expect(hs.tlsPhase).toBe(phase);
  return hs;
}

/** [reply types (minus the length for a frame that is not an option reply)], decision kind */
function outcome(step: HandshakeStep): [number[], string] {
  return [step.replies.map((r) => (r.length >= 16 && r.readBigUInt64BE(0) === 0x0003e889045565a9n ? r.readUInt32BE(12) : -r.length)), step.decision.kind];
}

const PROBES: Array<[string, number, Buffer]> = [
  ['EXPORT_NAME', OPT.EXPORT_NAME, Buffer.from('disk')],
  ['ABORT', OPT.ABORT, Buffer.alloc(0)],
  ['LIST', OPT.LIST, Buffer.alloc(0)],
  ['STARTTLS', OPT.STARTTLS, Buffer.alloc(0)],
  ['INFO', OPT.INFO, infoPayload('disk')],
  ['GO', OPT.GO, infoPayload('disk')],
  ['STRUCTURED_REPLY', OPT.STRUCTURED_REPLY, Buffer.alloc(0)],
  ['LIST_META_CONTEXT', OPT.LIST_META_CONTEXT, metaPayload('disk', [])],
  ['SET_META_CONTEXT', OPT.SET_META_CONTEXT, metaPayload('disk', ['base:allocation'])],
  ['EXTENDED_HEADERS', OPT.EXTENDED_HEADERS, Buffer.alloc(0)],
  ['unknown 0x4242', 0x4242, Buffer.alloc(0)],
  ['extension', LINK, Buffer.from('hi')],
];

const TLS_REQD: [number[], string] = [[REP.ERR_TLS_REQD], 'next'];
/** what each probe gets when options are served (no-tls, tls-offered, tls), but for STARTTLS */
const SERVED: Record<string, [number[], string]> = {
  EXPORT_NAME: [[-10], 'serve'], // not an option reply: size and flags, 10 bytes (NO_ZEROES)
  ABORT: [[REP.ACK], 'abort'],
  LIST: [[REP.SERVER, REP.ACK], 'next'],
  INFO: [[REP.INFO, REP.INFO, REP.ACK], 'next'],
  GO: [[REP.INFO, REP.INFO, REP.ACK], 'serve'],
  STRUCTURED_REPLY: [[REP.ACK], 'next'],
  LIST_META_CONTEXT: [[REP.ERR_INVALID], 'next'], // needs STRUCTURED_REPLY first
  SET_META_CONTEXT: [[REP.ERR_INVALID], 'next'],
  EXTENDED_HEADERS: [[REP.ERR_UNSUP], 'next'],
  'unknown 0x4242': [[REP.ERR_UNSUP], 'next'],
  extension: [[REP.ERR_POLICY], 'next'],
};

const EXPECTED: Record<string, Record<string, [number[], string]>> = {
  'no-tls': { ...SERVED, STARTTLS: [[REP.ERR_POLICY], 'next'] },
  'tls-offered': { ...SERVED, STARTTLS: [[REP.ACK], 'starttls'] },
  tls: { ...SERVED, STARTTLS: [[REP.ERR_INVALID], 'next'] },
  'tls-required': {
    ...Object.fromEntries(PROBES.map(([name]) => [name, TLS_REQD])),
    EXPORT_NAME: [[], 'close'],
    ABORT: [[REP.ACK], 'abort'],
    STARTTLS: [[REP.ACK], 'starttls'],
  },
};

describe('ServerHandshake: the option table by TLS phase', () => {
  for (const phase of ['no-tls', 'tls-offered', 'tls-required', 'tls'] as const) {
    for (const [name, option, data] of PROBES) {
      it(`${phase}: ${name} → ${JSON.stringify(EXPECTED[phase]![name])}`, () => {
        const accepted: string[] = [];
        const hs = handshake(phase, accepted);
        const got = outcome(hs.option(option, data));
        expect(got).toEqual(EXPECTED[phase]![name]);
        // an extension is not even asked before TLS on a server that requires it
        expect(accepted).toEqual(name === 'extension' && phase !== 'tls-required' ? ['hi'] : []);
      });
    }
  }

  it('every row of the table is probed', () => {
    const probed = new Set(PROBES.map(([, o]) => o));
    for (const row of OPTIONS) expect(probed.has(row.option), row.name).toBe(true);
  });

  it('before TLS on a require server only ABORT and STARTTLS rows list the phase', () => {
    expect(OPTIONS.filter((r) => r.phases.includes('tls-required')).map((r) => r.name).sort()).toEqual(['ABORT', 'STARTTLS']);
  });
});

describe('ServerHandshake: STARTTLS', () => {
  it('bytes already received after STARTTLS: close without an ACK (CVE-2021-3716)', () => {
    const hs = handshake('tls-offered');
    const step = hs.option(OPT.STARTTLS, Buffer.alloc(0), 16);
    expect(step.replies).toEqual([]);
    expect(step.decision).toEqual({ kind: 'close', reason: '16 bytes arrived in clear after STARTTLS, before its reply: an injection attempt' });
  });

  it('tlsUp forgets structured replies and meta contexts negotiated in clear', () => {
    const hs = handshake('tls-offered');
    expect(outcome(hs.option(OPT.STRUCTURED_REPLY, Buffer.alloc(0)))).toEqual([[REP.ACK], 'next']);
    expect(outcome(hs.option(OPT.SET_META_CONTEXT, metaPayload('disk', ['base:allocation'])))).toEqual([[REP.META_CONTEXT, REP.ACK], 'next']);
    expect(hs.option(OPT.STARTTLS, Buffer.alloc(0)).decision.kind).toBe('starttls');
    expect(hs.state).toBe('STARTTLS');
    hs.tlsUp();
    expect(hs.state).toBe('OPTIONS');
    const go = hs.option(OPT.GO, infoPayload('disk')).decision;
    expect(go.kind === 'serve' && { structured: go.structured, contexts: go.contexts.size }).toEqual({ structured: false, contexts: 0 });
  });

  it('without the reset, what is negotiated over TLS is kept until GO', () => {
    const hs = handshake('tls');
    hs.option(OPT.STRUCTURED_REPLY, Buffer.alloc(0));
    hs.option(OPT.SET_META_CONTEXT, metaPayload('disk', ['base:allocation']));
    const go = hs.option(OPT.GO, infoPayload('disk')).decision;
    expect(go.kind === 'serve' && { structured: go.structured, contexts: [...go.contexts.values()] }).toEqual({ structured: true, contexts: ['base:allocation'] });
    expect(hs.state).toBe('DONE');
  });

  it('a client without FIXED_NEWSTYLE: served in clear (no TLS) where TLS is offered, closed where it is required', () => {
    const offered = new ServerHandshake(host([]), { tls: 'on' });
    expect(offered.clientFlags(FLAG_C_NO_ZEROES).decision.kind).toBe('next');
    expect(offered.tlsPhase).toBe('no-tls');
    expect(outcome(offered.option(OPT.STARTTLS, Buffer.alloc(0)))).toEqual([[REP.ERR_POLICY], 'next']);
    const required = new ServerHandshake(host([]), { tls: 'require' });
    expect(required.clientFlags(FLAG_C_NO_ZEROES).decision).toEqual({
      kind: 'close', reason: 'the client did not set FIXED_NEWSTYLE, which TLS needs, on a server that requires TLS',
    });
    const plain = new ServerHandshake(host([]));
    expect(plain.clientFlags(0).decision.kind).toBe('next');
  });

  it('a server shutting down answers ERR_SHUTDOWN before any phase rule', () => {
    const hs = new ServerHandshake(host([], true), { tls: 'require' });
    hs.clientFlags(FLAG_C_FIXED_NEWSTYLE);
    expect(outcome(hs.option(OPT.LIST, Buffer.alloc(0)))).toEqual([[REP.ERR_SHUTDOWN], 'next']);
    expect(outcome(hs.option(OPT.ABORT, Buffer.alloc(0)))).toEqual([[REP.ACK], 'abort']);
  });
});
