/**
 * NBD server conformance: one test (or a few) per item 1–37 of the checklist in
 * nbd-qcow2-bitmaps.md A.15, asserting exact bytes and codes with a raw-socket client.
 *
 * The transport is a parameter (conformance.test.ts: in clear; conformance-tls.test.ts: x509 with
 * client certificates, and PSK): over TLS the raw client talks to a STARTTLS proxy, so every
 * option after the client flags and every request runs inside TLS against a FORCEDTLS server.
 * Only A.15-2 (no FIXED_NEWSTYLE: no TLS possible) is for the clear transport alone, and A.15-6
 * expects the TLS answer to a second STARTTLS (ERR_INVALID) instead of NOTLS's ERR_POLICY.
 */
import { afterAll, beforeAll, describe, expect, it, vi } from 'vitest';
import { MemoryNode } from '../../src/block/memory.js';
import { completeNode } from '../../src/block/node.js';
import {
  CHUNK, CMD, CMD_FLAG, FLAG_C_FIXED_NEWSTYLE, FLAG_C_NO_ZEROES, FLAG_FIXED_NEWSTYLE, FLAG_NO_ZEROES, IHAVEOPT,
  INFO, NBDMAGIC, OPT, OPTION_REPLY_MAGIC, REP, REPLY_FLAG_DONE, SIMPLE_REPLY_MAGIC, STATE_HOLE, STATE_ZERO, TF,
} from '../../src/nbd/constants.js';
import { encodeRequest } from '../../src/nbd/codec.js';
import {
  RawClient, assembleStructuredRead, blockStatusDescriptors, errorMessage, infoPayload, metaPayload,
  readReplyData, replyError, u32, type Chunk, type HandshakeOptions, type OptionReplyFrame, type Reply,
} from '../support/raw-client.js';
import { Gate, hookNode, type HookNode } from '../support/fault-node.js';
import { pattern, startServer as startTestServer, waitConnections, withTimeout, type NbdTestTransport, type TestServer } from './helpers.js';
import type { NbdServerOptions } from '../../src/nbd/server.js';


const EPERM = 1;
const EIO = 5;
const EINVAL = 22;
const ENOSPC = 28;
const EOVERFLOW = 75;
const ENOTSUP = 95;
const ESHUTDOWN = 108;

const MiB = 1 << 20;
const SIZE = 64 * MiB;
const SMALL = 1 * MiB;
const FAULT_AT = 65536;

export function conformanceSuite(transport: NbdTestTransport): void {
  vi.setConfig({ testTimeout: 30_000, hookTimeout: 30_000 });
  const startServer = (options: NbdServerOptions): Promise<TestServer> => startTestServer(options, transport);
  const tls = transport !== 'plain';

  describe(`NBD conformance (${transport})`, () => {
    let S: TestServer;
    let rec: HookNode;
    let faulty: HookNode;
    let gated: HookNode;
    const gate = new Gate();
    const clients: RawClient[] = [];

    const EXPORT_NAMES = ['', 'ro', 'aligned', 'nofz', 'faulty', 'rec', 'gated'];

    beforeAll(async () => {
      rec = hookNode(new MemoryNode(SMALL));
      faulty = hookNode(new MemoryNode(SMALL), { failReads: [[FAULT_AT, FAULT_AT + 4096]] });
      gated = hookNode(new MemoryNode(SMALL), { gate, gateOps: ['read', 'write'] });
      S = await startServer({
        handshakeTimeoutMs: 2000,
        exports: [
          { name: '', description: 'd', node: completeNode(new MemoryNode(SIZE)) },
          { name: 'ro', description: 'read-only', node: completeNode(new MemoryNode(SMALL)), readOnly: true },
          { name: 'aligned', node: completeNode(new MemoryNode(SMALL)), minimumBlockSize: 4096 },
          { name: 'nofz', node: completeNode(hookNode(new MemoryNode(SMALL), { omit: ['writeZeroes'] })) },
          { name: 'faulty', node: completeNode(faulty) },
          { name: 'rec', node: completeNode(rec) },
          { name: 'gated', node: completeNode(gated) },
        ],
      });
    });

    afterAll(async () => {
      for (const c of clients) c.destroy();
      gate.open();
      await S?.close();
    });

    async function connect(path = S.path): Promise<RawClient> {
      const c = await RawClient.connect(path);
      clients.push(c);
      return c;
    }

    async function open(o: HandshakeOptions = {}, path = S.path) {
      const { client, info } = await RawClient.open(path, o);
      clients.push(client);
      return { c: client, info };
    }

    /** Connected, greeting read, fixed-newstyle + NO_ZEROES flags sent: ready for options. */
    async function optionsPhase(path = S.path): Promise<RawClient> {
      const c = await connect(path);
      await c.readGreeting();
      c.sendClientFlags(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);
      return c;
    }

    function expectReplyHeader(r: OptionReplyFrame, option: number, type: number): void {
      expect(r.magic).toBe(OPTION_REPLY_MAGIC);
      expect(r.option).toBe(option);
      expect(r.type >>> 0).toBe(type >>> 0);
      expect(r.data.length).toBe(r.length);
      if (r.type & 0x80000000) expectNbdString(r.data);
    }

    /** An NBD string (error messages, names): valid UTF-8, no NUL, at most 4096 bytes. */
    function expectNbdString(b: Buffer): void {
      expect(b.length).toBeLessThanOrEqual(4096);
      expect(Buffer.from(b.toString('utf8'), 'utf8').equals(b)).toBe(true);
      expect(b.includes(0)).toBe(false);
    }

    /** A GO on the default export must still work on this connection. */
    async function expectGoWorks(c: RawClient): Promise<void> {
      const r = await c.option(OPT.GO, infoPayload('', []));
      expect(r[r.length - 1]!.type).toBe(REP.ACK);
      const data = await c.read(0, 512);
      expect(data.length).toBe(512);
    }

    function errorChunkOf(r: Reply): Chunk {
      if (r.kind !== 'structured') throw new Error('expected a structured reply');
      const last = r.chunks[r.chunks.length - 1]!;
      expect(last.type === CHUNK.ERROR || last.type === CHUNK.ERROR_OFFSET).toBe(true);
      return last;
    }

    /** Structured error reply: error chunk with DONE, errno, message ≤ 4096 and consistent lengths. */
    function expectErrorChunk(r: Reply, errno: number): void {
      const c = errorChunkOf(r);
      expect(c.flags & REPLY_FLAG_DONE).toBe(REPLY_FLAG_DONE);
      expect(c.length).toBeGreaterThanOrEqual(6);
      expect(c.payload.readUInt32BE(0)).toBe(errno);
      const msgLen = c.payload.readUInt16BE(4);
      expect(msgLen).toBeLessThanOrEqual(4096);
      expectNbdString(c.payload.subarray(6, 6 + msgLen));
      expect(c.length).toBe(6 + msgLen + (c.type === CHUNK.ERROR_OFFSET ? 8 : 0));
    }

    /** The reply carries `errno`, in whichever form the connection uses. */
    function expectError(c: RawClient, r: Reply, errno: number): void {
      if (c.structured) {
        expect(r.kind).toBe('structured');
        expectErrorChunk(r, errno);
      } else {
        expect(r.kind).toBe('simple');
        expect(replyError(r)).toBe(errno);
        if (r.kind === 'simple') expect(r.data).toBeUndefined();
      }
    }

    function expectOk(r: Reply): void {
      expect(replyError(r), errorMessage(r)).toBe(0);
    }

    const isPow2 = (n: number) => n > 0 && (n & (n - 1)) === 0;

    // =================================================================================================
    describe('A.15 server, handshake', () => {
      it(`the transport is ${transport}: ${tls ? 'each connection is upgraded to TLS before its first option' : 'no TLS'}`, async () => {
        const before = S.tlsUpgrades;
        const { c } = await open();
        expect((await c.read(0, 512)).length).toBe(512);
        expect(S.tlsUpgrades).toBe(before + (tls ? 1 : 0));
      });

      it('A.15-1 greeting is exactly 18 bytes: NBDMAGIC, IHAVEOPT, FIXED_NEWSTYLE|NO_ZEROES', async () => {
        const c = await connect();
        const g = await c.readGreeting();
        expect(g.raw.length).toBe(18);
        expect(g.magic).toBe(NBDMAGIC);
        expect(g.raw.subarray(0, 8).toString('latin1')).toBe('NBDMAGIC');
        expect(g.ihaveopt).toBe(IHAVEOPT);
        expect(g.raw.subarray(8, 16).toString('latin1')).toBe('IHAVEOPT');
        expect(g.flags).toBe(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
        // nothing else until the client speaks
        expect(c.buffered).toBe(0);
        c.sendClientFlags(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);
        // the very next bytes are an option reply, so the greeting was not followed by anything
        const r = await c.option(OPT.LIST);
        expect(r[0]!.magic).toBe(OPTION_REPLY_MAGIC);
        c.destroy();
      });

      it.each([
        ['unknown bit 2', 1 << 2],
        ['unknown bit 31', 0x80000000],
        ['all bits', 0xffffffff],
        ['FIXED_NEWSTYLE plus an unknown bit', FLAG_C_FIXED_NEWSTYLE | 0x100],
      ])('A.15-2 client flags with %s → connection closed without a reply', async (_n, flags) => {
        // (The "NO_ZEROES not offered" half of item 2 cannot arise: this server always offers NO_ZEROES.)
        const c = await connect();
        await c.readGreeting();
        c.sendClientFlags(flags);
        c.sendOption(OPT.LIST);
        expect((await c.expectEof()).length).toBe(0);
      });

      // without fixed newstyle there is no STARTTLS: over TLS, test/nbd/server-starttls.test.ts
      if (!tls) it('A.15-2 client flags without FIXED_NEWSTYLE are tolerated (NOTLS)', async () => {
        const c = await connect();
        await c.readGreeting();
        c.sendClientFlags(0);
        const r = await c.option(OPT.LIST);
        expect(r[r.length - 1]!.type).toBe(REP.ACK);
        c.destroy();
      });

      it('A.15-3 unknown option gets ERR_UNSUP and the connection stays usable', async () => {
        const c = await optionsPhase();
        for (const code of [0x7777, 4 /* PEEK_EXPORT, withdrawn */, 0xffffffff, 0x80000001, 12, 0]) {
          const r = await c.option(code, Buffer.alloc(100, 0xab));
          expect(r.length).toBe(1);
          expectReplyHeader(r[0]!, code, REP.ERR_UNSUP);
        }
        const r = await c.option(0x7777);
        expectReplyHeader(r[0]!, 0x7777, REP.ERR_UNSUP);
        await expectGoWorks(c);
        c.destroy();
      });

      it('A.15-4 LIST without data: one REP_SERVER per export then ACK; with data: ERR_INVALID', async () => {
        const c = await optionsPhase();
        const r = await c.option(OPT.LIST);
        const servers = r.slice(0, -1);
        for (const s of servers) expectReplyHeader(s, OPT.LIST, REP.SERVER);
        expectReplyHeader(r[r.length - 1]!, OPT.LIST, REP.ACK);
        expect(r[r.length - 1]!.length).toBe(0);
        const names = servers.map((s) => {
          const n = s.data.readUInt32BE(0);
          expect(n).toBeLessThanOrEqual(s.data.length - 4);
          return s.data.toString('utf8', 4, 4 + n);
        });
        expect(names.sort()).toEqual([...EXPORT_NAMES].sort());
        const def = servers.find((s) => s.data.readUInt32BE(0) === 0)!;
        expect(def.data.toString('utf8', 4)).toBe('d');

        const bad = await c.option(OPT.LIST, Buffer.from('x'));
        expect(bad.length).toBe(1);
        expectReplyHeader(bad[0]!, OPT.LIST, REP.ERR_INVALID);
        await expectGoWorks(c);
        c.destroy();
      });

      it('A.15-5 ABORT → ACK, then EOF', async () => {
        const c = await optionsPhase();
        c.sendOption(OPT.ABORT);
        const r = await c.readOptionReply();
        expectReplyHeader(r, OPT.ABORT, REP.ACK);
        expect(r.length).toBe(0);
        expect((await c.expectEof()).length).toBe(0);
      });

      it('A.15-5 ABORT with data is still ACKed', async () => {
        const c = await optionsPhase();
        c.sendOption(OPT.ABORT, Buffer.from('ignored'));
        expectReplyHeader(await c.readOptionReply(), OPT.ABORT, REP.ACK);
        await c.expectEof();
      });

      it('A.15-5 a client that closes right after sending ABORT does not upset the server', async () => {
        for (let i = 0; i < 5; i++) {
          const c = await optionsPhase();
          c.sendOption(OPT.ABORT);
          c.destroy();
        }
        const { c } = await open();
        expect((await c.read(0, 4096)).length).toBe(4096);
        c.destroy();
      });

      it(`A.15-6 STARTTLS with data → ERR_INVALID; ${tls ? 'a second STARTTLS inside TLS → ERR_INVALID' : 'in NOTLS mode → ERR_POLICY'}, never ERR_TLS_REQD`, async () => {
        const c = await optionsPhase();
        const withData = await c.option(OPT.STARTTLS, Buffer.from('abc'));
        expect(withData.length).toBe(1);
        expectReplyHeader(withData[0]!, OPT.STARTTLS, REP.ERR_INVALID);
        const plain = await c.option(OPT.STARTTLS);
        expect(plain.length).toBe(1);
        expect(plain[0]!.magic).toBe(OPTION_REPLY_MAGIC);
        expect(plain[0]!.option).toBe(OPT.STARTTLS);
        expect(tls ? [REP.ERR_INVALID] : [REP.ERR_POLICY, REP.ERR_UNSUP]).toContain(plain[0]!.type);
        expect(plain[0]!.type).not.toBe(REP.ERR_TLS_REQD);
        await expectGoWorks(c);
        c.destroy();
      });

      // A.15-7 (FORCEDTLS) is N/A here: this server has no TLS configured (NOTLS mode), which requires
      // that ERR_TLS_REQD is never sent, whatever the option. FORCEDTLS: test/nbd/server-starttls.test.ts.
      it('A.15-7 N/A (NOTLS mode): no option ever gets ERR_TLS_REQD, EXPORT_NAME is served without TLS', async () => {
        const c = await optionsPhase();
        const probes: Array<[number, Buffer]> = [
          [OPT.LIST, Buffer.alloc(0)],
          [OPT.INFO, infoPayload('')],
          [OPT.INFO, infoPayload('nope')],
          [0x4242, Buffer.alloc(0)],
          [OPT.STARTTLS, Buffer.alloc(0)],
          [OPT.STARTTLS, Buffer.alloc(0)],
          [OPT.STRUCTURED_REPLY, Buffer.alloc(0)],
          [OPT.LIST_META_CONTEXT, metaPayload('', [])],
        ];
        for (const [o, d] of probes) {
          const r = await c.option(o, d);
          for (const x of r) expect(x.type).not.toBe(REP.ERR_TLS_REQD);
        }
        c.sendOption(OPT.EXPORT_NAME, Buffer.alloc(0));
        const b = await c.readExact(10);
        expect(Number(b.readBigUInt64BE(0))).toBe(SIZE);
        c.destroy();
      });

      it('A.15-8 INFO on an unknown export → ERR_UNKNOWN and no REP_INFO', async () => {
        const c = await optionsPhase();
        for (const name of ['nope', 'RO', ' ', 'x'.repeat(4096), '€'.repeat(1365), 'a\u0000b']) {
          const r = await c.option(OPT.INFO, infoPayload(name, [INFO.NAME, INFO.BLOCK_SIZE]));
          expect(r.length).toBe(1);
          expectReplyHeader(r[0]!, OPT.INFO, REP.ERR_UNKNOWN);
        }
        const g = await c.option(OPT.GO, infoPayload('nope'));
        expect(g.length).toBe(1);
        expectReplyHeader(g[0]!, OPT.GO, REP.ERR_UNKNOWN);
        await expectGoWorks(c);
        c.destroy();
      });

      it('A.15-8 INFO/GO with namelen > optlen − 6 (or too short) → ERR_INVALID', async () => {
        const c = await optionsPhase();
        const cases: Buffer[] = [
          Buffer.concat([u32(1), Buffer.from('\x00\x00')]), // namelen 1, optlen 6: 1 > 0
          Buffer.concat([u32(100), Buffer.from('ro'), Buffer.alloc(2)]),
          Buffer.concat([u32(0xffffffff), Buffer.alloc(2)]),
          Buffer.alloc(5), // shorter than the fixed fields
          Buffer.alloc(0),
          Buffer.concat([u32(0), Buffer.from([0, 2]), Buffer.from([0, 1])]), // 2 info requests, 1 present
          Buffer.concat([u32(0), Buffer.from([0, 0]), Buffer.from([0])]), // a byte left over
        ];
        for (const opt of [OPT.INFO, OPT.GO]) {
          for (const d of cases) {
            const r = await c.option(opt, d);
            expect(r.length).toBe(1);
            expectReplyHeader(r[0]!, opt, REP.ERR_INVALID);
          }
        }
        await expectGoWorks(c);
        c.destroy();
      });

      it.each([false, true])('A.15-9 INFO/GO success: INFO_EXPORT (len 12) before ACK; same size & flags in INFO and GO (structured %s)', async (structured) => {
        for (const name of EXPORT_NAMES) {
          const c = await optionsPhase();
          if (structured) expect((await c.option(OPT.STRUCTURED_REPLY))[0]!.type).toBe(REP.ACK);
          const infos: number[] = [INFO.NAME, INFO.DESCRIPTION, INFO.BLOCK_SIZE];
          const seen: Array<{ size: bigint; flags: number }> = [];
          for (const opt of [OPT.INFO, OPT.GO]) {
            const r = await c.option(opt, infoPayload(name, infos));
            const last = r[r.length - 1]!;
            expectReplyHeader(last, opt, REP.ACK);
            expect(last.length).toBe(0);
            const exportInfos = r.filter((x) => x.type === REP.INFO && x.data.readUInt16BE(0) === INFO.EXPORT);
            expect(exportInfos.length).toBe(1);
            const ei = exportInfos[0]!;
            expectReplyHeader(ei, opt, REP.INFO);
            expect(ei.length).toBe(12);
            for (const x of r.slice(0, -1)) {
              expectReplyHeader(x, opt, REP.INFO);
              expect(x.length).toBeGreaterThanOrEqual(2);
            }
            seen.push({ size: ei.data.readBigUInt64BE(2), flags: ei.data.readUInt16BE(10) });
          }
          expect(seen[1]).toEqual(seen[0]);
          // GO moved us to transmission: a request works right away
          const rr = await c.request(CMD.READ, { offset: 0, length: 4096 });
          expect(rr.kind).toBe(structured ? 'structured' : 'simple');
          expect(replyError(rr)).toBe(0);
          c.destroy();
        }
      });

      it('A.15-10 INFO_BLOCK_SIZE is 14 bytes and obeys the power-of-two and ordering rules', async () => {
        for (const name of EXPORT_NAMES) {
          const c = await optionsPhase();
          const r = await c.option(OPT.GO, infoPayload(name, [INFO.BLOCK_SIZE]));
          expect(r[r.length - 1]!.type).toBe(REP.ACK);
          const bs = r.filter((x) => x.type === REP.INFO && x.data.readUInt16BE(0) === INFO.BLOCK_SIZE);
          expect(bs.length).toBe(1);
          expect(bs[0]!.length).toBe(14);
          const d = bs[0]!.data;
          const min = d.readUInt32BE(2);
          const pref = d.readUInt32BE(6);
          const max = d.readUInt32BE(10);
          expect(isPow2(min)).toBe(true);
          expect(min).toBeLessThanOrEqual(65536);
          expect(isPow2(pref)).toBe(true);
          expect(pref).toBeGreaterThanOrEqual(Math.max(min, 512));
          expect(max).toBeGreaterThanOrEqual(pref);
          const ei = r.find((x) => x.type === REP.INFO && x.data.readUInt16BE(0) === INFO.EXPORT)!;
          const size = Number(ei.data.readBigUInt64BE(2));
          expect(size % min).toBe(0);
          if (size >= MiB) expect(max).toBeGreaterThanOrEqual(MiB);
          if (name === 'aligned') expect(min).toBe(4096);
          c.destroy();
        }
      });

      it('A.15-11 empty name selects the default export; NAME and DESCRIPTION are returned when asked', async () => {
        const c = await optionsPhase();
        const r = await c.option(OPT.INFO, infoPayload('', [INFO.NAME, INFO.DESCRIPTION]));
        const by = new Map(r.filter((x) => x.type === REP.INFO).map((x) => [x.data.readUInt16BE(0), x.data]));
        expect(Number(by.get(INFO.EXPORT)!.readBigUInt64BE(2))).toBe(SIZE);
        expect(by.get(INFO.NAME)!.length).toBe(2);
        expect(by.get(INFO.DESCRIPTION)!.toString('utf8', 2)).toBe('d');
        const ro = await c.option(OPT.INFO, infoPayload('ro', [INFO.NAME, INFO.DESCRIPTION]));
        const byRo = new Map(ro.filter((x) => x.type === REP.INFO).map((x) => [x.data.readUInt16BE(0), x.data]));
        expect(byRo.get(INFO.NAME)!.toString('utf8', 2)).toBe('ro');
        expect(byRo.get(INFO.DESCRIPTION)!.toString('utf8', 2)).toBe('read-only');
        expect(Number(byRo.get(INFO.EXPORT)!.readBigUInt64BE(2))).toBe(SMALL);
        // unknown info types are ignored, duplicates tolerated
        const odd = await c.option(OPT.INFO, infoPayload('', [0x7777, INFO.NAME, INFO.NAME]));
        expect(odd[odd.length - 1]!.type).toBe(REP.ACK);
        c.destroy();
      });

      it('A.15-12 after GO\'s ACK no padding: the next bytes are the first reply', async () => {
        const c = await optionsPhase();
        const r = await c.option(OPT.GO, infoPayload(''));
        expect(r[r.length - 1]!.type).toBe(REP.ACK);
        expect(c.buffered).toBe(0);
        c.sendRaw(encodeRequest(0, CMD.FLUSH, 0xabcdefn, 0, 0));
        const b = await c.readExact(16);
        expect(b.readUInt32BE(0)).toBe(SIMPLE_REPLY_MAGIC);
        expect(b.readUInt32BE(4)).toBe(0);
        expect(b.readBigUInt64BE(8)).toBe(0xabcdefn);
        c.destroy();
      });

      it.each([
        ['without NO_ZEROES: size, flags, 124 zero bytes', false],
        ['with NO_ZEROES: size and flags only', true],
      ])('A.15-12 EXPORT_NAME answer %s', async (_n, noZeroes) => {
        const c = await connect();
        await c.readGreeting();
        c.sendClientFlags(FLAG_C_FIXED_NEWSTYLE | (noZeroes ? FLAG_C_NO_ZEROES : 0));
        c.sendOption(OPT.EXPORT_NAME, Buffer.from('ro'));
        const b = await c.readExact(noZeroes ? 10 : 134);
        expect(Number(b.readBigUInt64BE(0))).toBe(SMALL);
        const flags = b.readUInt16BE(8);
        expect(flags & TF.HAS_FLAGS).toBe(TF.HAS_FLAGS);
        expect(flags & TF.READ_ONLY).toBe(TF.READ_ONLY);
        if (!noZeroes) expect(b.subarray(10).equals(Buffer.alloc(124))).toBe(true);
        c.sendRaw(encodeRequest(0, CMD.FLUSH, 77n, 0, 0));
        const rep = await c.readExact(16);
        expect(rep.readUInt32BE(0)).toBe(SIMPLE_REPLY_MAGIC);
        expect(rep.readBigUInt64BE(8)).toBe(77n);
        c.destroy();
      });

      it('A.15-13 EXPORT_NAME for an unknown export → closed without a reply', async () => {
        for (const name of ['nope', 'x'.repeat(5000)]) {
          const c = await optionsPhase();
          c.sendOption(OPT.EXPORT_NAME, Buffer.from(name));
          expect((await c.expectEof()).length).toBe(0);
        }
      });

      it('A.15-14 STRUCTURED_REPLY with data → ERR_INVALID, without → ACK', async () => {
        const c = await optionsPhase();
        const bad = await c.option(OPT.STRUCTURED_REPLY, Buffer.alloc(4));
        expect(bad.length).toBe(1);
        expectReplyHeader(bad[0]!, OPT.STRUCTURED_REPLY, REP.ERR_INVALID);
        const ok = await c.option(OPT.STRUCTURED_REPLY);
        expect(ok.length).toBe(1);
        expectReplyHeader(ok[0]!, OPT.STRUCTURED_REPLY, REP.ACK);
        expect(ok[0]!.length).toBe(0);
        c.structured = true;
        const go = await c.option(OPT.GO, infoPayload(''));
        const ei = go.find((x) => x.type === REP.INFO && x.data.readUInt16BE(0) === INFO.EXPORT)!;
        expect(ei.data.readUInt16BE(10) & TF.SEND_DF).toBe(TF.SEND_DF);
        const r = await c.request(CMD.READ, { offset: 0, length: 4096 });
        expect(r.kind).toBe('structured');
        c.destroy();
      });

      it('A.15-15 SET/LIST_META_CONTEXT before STRUCTURED_REPLY → ERR_INVALID', async () => {
        const c = await optionsPhase();
        for (const opt of [OPT.LIST_META_CONTEXT, OPT.SET_META_CONTEXT]) {
          const r = await c.option(opt, metaPayload('', ['base:allocation']));
          expect(r.length).toBe(1);
          expectReplyHeader(r[0]!, opt, REP.ERR_INVALID);
        }
        await expectGoWorks(c);
        c.destroy();
      });

      it('A.15-16 LIST_META_CONTEXT: all, base: wildcard, unknown namespaces, truncated query', async () => {
        const c = await optionsPhase();
        await c.option(OPT.STRUCTURED_REPLY);
        const names = (r: OptionReplyFrame[]) => {
          expectReplyHeader(r[r.length - 1]!, OPT.LIST_META_CONTEXT, REP.ACK);
          return r.slice(0, -1).map((x) => {
            expectReplyHeader(x, OPT.LIST_META_CONTEXT, REP.META_CONTEXT);
            return x.data.toString('utf8', 4);
          });
        };
        expect(names(await c.option(OPT.LIST_META_CONTEXT, metaPayload('', [])))).toContain('base:allocation');
        expect(names(await c.option(OPT.LIST_META_CONTEXT, metaPayload('', ['base:'])))).toEqual(['base:allocation']);
        expect(names(await c.option(OPT.LIST_META_CONTEXT, metaPayload('', ['base:allocation'])))).toEqual(['base:allocation']);
        // qemu: contexts (section D) are not offered by plain memory exports: the wildcards list nothing
        expect(names(await c.option(OPT.LIST_META_CONTEXT, metaPayload('', ['qemu:'])))).toEqual([]);
        expect(names(await c.option(OPT.LIST_META_CONTEXT, metaPayload('', ['qemu:dirty-bitmap:'])))).toEqual([]);
        expect(names(await c.option(OPT.LIST_META_CONTEXT, metaPayload('', ['x-unknown:thing', 'nbd-server:foo'])))).toEqual([]);
        expect(names(await c.option(OPT.LIST_META_CONTEXT, metaPayload('', ['base:nosuchleaf'])))).toEqual([]);
        expect(names(await c.option(OPT.LIST_META_CONTEXT, metaPayload('ro', ['base:'])))).toEqual(['base:allocation']);

        const ok = metaPayload('', ['base:allocation']);
        const truncated: Buffer[] = [
          ok.subarray(0, ok.length - 1), // query runs past the option
          Buffer.concat([u32(0), u32(1), u32(100), Buffer.from('abc')]),
          Buffer.concat([u32(0), u32(2), u32(3), Buffer.from('abc')]), // second query missing
          Buffer.concat([u32(50), Buffer.from('short')]),
          Buffer.alloc(3),
          Buffer.concat([ok, Buffer.from('trailing')]),
        ];
        for (const d of truncated) {
          const r = await c.option(OPT.LIST_META_CONTEXT, d);
          expect(r.length).toBe(1);
          expectReplyHeader(r[0]!, OPT.LIST_META_CONTEXT, REP.ERR_INVALID);
        }
        const unknown = await c.option(OPT.LIST_META_CONTEXT, metaPayload('nope', []));
        expect(unknown.length).toBe(1);
        expect(unknown[0]!.type & 0x80000000).not.toBe(0);
        c.destroy();
      });

      it('A.15-17 SET_META_CONTEXT base:allocation → one REP_META_CONTEXT (id, name) + ACK, used by BLOCK_STATUS', async () => {
        const c = await optionsPhase();
        await c.option(OPT.STRUCTURED_REPLY);
        c.structured = true;
        const r = await c.option(OPT.SET_META_CONTEXT, metaPayload('', ['base:allocation']));
        expect(r.length).toBe(2);
        expectReplyHeader(r[0]!, OPT.SET_META_CONTEXT, REP.META_CONTEXT);
        expect(r[0]!.length).toBe(4 + 'base:allocation'.length);
        const id = r[0]!.data.readUInt32BE(0);
        expect(r[0]!.data.toString('utf8', 4)).toBe('base:allocation');
        expectReplyHeader(r[1]!, OPT.SET_META_CONTEXT, REP.ACK);
        expect((await c.option(OPT.GO, infoPayload('')))[0]!.type).toBe(REP.INFO);
        const bs = await c.request(CMD.BLOCK_STATUS, { offset: 0, length: 65536 });
        expectOk(bs);
        if (bs.kind !== 'structured') throw new Error('expected structured');
        expect(bs.chunks.length).toBe(1);
        expect(blockStatusDescriptors(bs.chunks[0]!).contextId).toBe(id);
        c.destroy();
      });

      it.each([
        ['base:', ['base:']],
        ['unknown names', ['base:nosuchleaf', 'x-foo:bar', 'qemu:dirty-bitmap:none']],
        ['zero queries', []],
      ])('A.15-17 SET_META_CONTEXT with %s selects nothing (BLOCK_STATUS → EINVAL)', async (_n, queries) => {
        const c = await optionsPhase();
        await c.option(OPT.STRUCTURED_REPLY);
        c.structured = true;
        const r = await c.option(OPT.SET_META_CONTEXT, metaPayload('', queries));
        expect(r.length).toBe(1);
        expectReplyHeader(r[0]!, OPT.SET_META_CONTEXT, REP.ACK);
        await c.option(OPT.GO, infoPayload(''));
        expectError(c, await c.request(CMD.BLOCK_STATUS, { offset: 0, length: 4096 }), EINVAL);
        c.destroy();
      });

      it('A.15-17 a second SET replaces the first', async () => {
        // SET twice: only the second id is used
        {
          const c = await optionsPhase();
          await c.option(OPT.STRUCTURED_REPLY);
          c.structured = true;
          const a = await c.option(OPT.SET_META_CONTEXT, metaPayload('', ['base:allocation']));
          const b = await c.option(OPT.SET_META_CONTEXT, metaPayload('', ['base:allocation']));
          const idB = b[0]!.data.readUInt32BE(0);
          expect(a[0]!.type).toBe(REP.META_CONTEXT);
          await c.option(OPT.GO, infoPayload(''));
          const bs = await c.request(CMD.BLOCK_STATUS, { offset: 0, length: 4096 });
          if (bs.kind !== 'structured') throw new Error('expected structured');
          expect(bs.chunks.length).toBe(1);
          expect(blockStatusDescriptors(bs.chunks[0]!).contextId).toBe(idB);
          c.destroy();
        }
        // SET base:allocation, then SET selecting nothing: nothing is selected
        {
          const c = await optionsPhase();
          await c.option(OPT.STRUCTURED_REPLY);
          c.structured = true;
          await c.option(OPT.SET_META_CONTEXT, metaPayload('', ['base:allocation']));
          await c.option(OPT.SET_META_CONTEXT, metaPayload('', ['x-foo:bar']));
          await c.option(OPT.GO, infoPayload(''));
          expectError(c, await c.request(CMD.BLOCK_STATUS, { offset: 0, length: 4096 }), EINVAL);
          c.destroy();
        }
        // a failed SET (malformed) also clears the selection
        {
          const c = await optionsPhase();
          await c.option(OPT.STRUCTURED_REPLY);
          c.structured = true;
          await c.option(OPT.SET_META_CONTEXT, metaPayload('', ['base:allocation']));
          const bad = await c.option(OPT.SET_META_CONTEXT, Buffer.concat([u32(0), u32(1), u32(99)]));
          expectReplyHeader(bad[0]!, OPT.SET_META_CONTEXT, REP.ERR_INVALID);
          await c.option(OPT.GO, infoPayload(''));
          expectError(c, await c.request(CMD.BLOCK_STATUS, { offset: 0, length: 4096 }), EINVAL);
          c.destroy();
        }
        // SET on one export, GO to another: nothing is selected
        {
          const c = await optionsPhase();
          await c.option(OPT.STRUCTURED_REPLY);
          c.structured = true;
          await c.option(OPT.SET_META_CONTEXT, metaPayload('ro', ['base:allocation']));
          await c.option(OPT.GO, infoPayload(''));
          expectError(c, await c.request(CMD.BLOCK_STATUS, { offset: 0, length: 4096 }), EINVAL);
          c.destroy();
        }
      });

      it('A.15-18 EXTENDED_HEADERS → ERR_UNSUP, connection still usable', async () => {
        const c = await optionsPhase();
        const r = await c.option(OPT.EXTENDED_HEADERS);
        expect(r.length).toBe(1);
        expectReplyHeader(r[0]!, OPT.EXTENDED_HEADERS, REP.ERR_UNSUP);
        // structured replies still negotiable afterwards
        expectReplyHeader((await c.option(OPT.STRUCTURED_REPLY))[0]!, OPT.STRUCTURED_REPLY, REP.ACK);
        c.structured = true;
        await expectGoWorks(c);
        c.destroy();
      });

      it('A.15-19 while shutting down, options get ERR_SHUTDOWN (ABORT still ACKed)', async () => {
        const T = await startServer({ handshakeTimeoutMs: 10_000, exports: [{ name: '', node: completeNode(new MemoryNode(SMALL)) }] });
        try {
          const c = await optionsPhase(T.path);
          expect((await c.option(OPT.STRUCTURED_REPLY))[0]!.type).toBe(REP.ACK);
          const down = T.srv.shutdown();
          for (const [opt, data] of [
            [OPT.LIST, Buffer.alloc(0)],
            [OPT.INFO, infoPayload('')],
            [OPT.GO, infoPayload('')],
            [OPT.SET_META_CONTEXT, metaPayload('', ['base:allocation'])],
            [0x7777, Buffer.alloc(0)],
          ] as Array<[number, Buffer]>) {
            const r = await c.option(opt, data);
            expect(r.length).toBe(1);
            expectReplyHeader(r[0]!, opt, REP.ERR_SHUTDOWN);
          }
          // a new connection is refused outright
          const late = await RawClient.connect(T.path);
          expect((await late.expectEof()).length).toBe(0);
          // the client soft-disconnects
          c.sendOption(OPT.ABORT);
          expectReplyHeader(await c.readOptionReply(), OPT.ABORT, REP.ACK);
          await c.expectEof();
          await withTimeout(down, 5000, 'shutdown');
        } finally {
          await T.close();
        }
      });

      it('A.15-19 EXPORT_NAME while shutting down closes the connection', async () => {
        const T = await startServer({ handshakeTimeoutMs: 10_000, exports: [{ name: '', node: completeNode(new MemoryNode(SMALL)) }] });
        try {
          const c = await optionsPhase(T.path);
          expectReplyHeader((await c.option(OPT.LIST)).pop()!, OPT.LIST, REP.ACK);
          const down = T.srv.shutdown();
          c.sendOption(OPT.EXPORT_NAME, Buffer.alloc(0));
          expect((await c.expectEof()).length).toBe(0);
          await withTimeout(down, 5000, 'shutdown');
        } finally {
          await T.close();
        }
      });
    });

    // =================================================================================================
    describe('A.15 server, transmission', () => {
      it.each([false, true])('A.15-20 every reply carries the request\'s cookie (structured %s)', async (structured) => {
        const { c } = await open({ structured, metaContexts: structured ? ['base:allocation'] : undefined });
        const cookies = [0n, 1n, 0x8000000000000000n, 0xffffffffffffffffn, 0x0123456789abcdefn];
        const cmds: Array<[number, number, number]> = [
          [CMD.READ, 0, 4096],
          [CMD.FLUSH, 0, 0],
          [CMD.TRIM, 0, 4096],
          [CMD.WRITE_ZEROES, 0, 4096],
          [CMD.CACHE, 0, 4096],
          [99, 0, 0],
          [CMD.READ, SIZE, 4096], // error
        ];
        if (structured) cmds.push([CMD.BLOCK_STATUS, 0, 4096]);
        for (const cookie of cookies) {
          for (const [type, offset, length] of cmds) {
            c.send(type, { cookie, offset, length });
            const r = await c.readReply();
            expect(r.cookie).toBe(cookie);
            if (r.kind === 'structured') for (const ch of r.chunks) expect(ch.cookie).toBe(cookie);
          }
          c.send(CMD.WRITE, { cookie, offset: 8192, data: pattern(512, 3) });
          expect((await c.readReply()).cookie).toBe(cookie);
        }
        // pipelined: all replies arrive, each cookie exactly once
        const sent = new Set<bigint>();
        for (let i = 0; i < 40; i++) sent.add(c.send(i % 2 ? CMD.READ : CMD.WRITE, { offset: i * 4096, length: 4096, data: i % 2 ? undefined : pattern(4096, i) }));
        const got = new Set<bigint>();
        for (let i = 0; i < 40; i++) got.add((await c.readReply()).cookie);
        expect(got).toEqual(sent);
        c.destroy();
      });

      it('A.15-20 replies to pipelined requests may be reordered: a quick request overtakes a held one', async () => {
        const { c } = await open({ exportName: 'gated' });
        gate.close();
        try {
          const slow = c.send(CMD.READ, { offset: 0, length: 4096 });
          await gate.waitEntered(1);
          const quick = c.send(CMD.FLUSH);
          const first = await c.readReply();
          expect(first.cookie).toBe(quick);
          gate.open();
          const second = await c.readReply();
          expect(second.cookie).toBe(slow);
          expectOk(second);
        } finally {
          gate.open();
          c.destroy();
        }
      });

      it.each([false, true])('A.15-21 READ/WRITE/TRIM/WRITE_ZEROES beyond the end → EINVAL/ENOSPC/EINVAL/ENOSPC, connection usable (structured %s)', async (structured) => {
        const { c, info } = await open({ structured });
        expect(info.size).toBe(SIZE);
        const cases: Array<[number, number | bigint, number, number]> = [
          [CMD.READ, SIZE - 512, 1024, EINVAL],
          [CMD.READ, SIZE, 1, EINVAL],
          [CMD.READ, 0xffffffffffffffffn, 512, EINVAL],
          [CMD.READ, 2n ** 53n, 512, EINVAL],
          [CMD.WRITE, SIZE - 512, 1024, ENOSPC],
          [CMD.WRITE, SIZE, 512, ENOSPC],
          [CMD.WRITE, 0xfffffffffffffe00n, 512, ENOSPC],
          [CMD.TRIM, SIZE - 512, 1024, EINVAL],
          [CMD.TRIM, 0xffffffffffffffffn, 1, EINVAL],
          [CMD.WRITE_ZEROES, SIZE - 512, 1024, ENOSPC],
          [CMD.WRITE_ZEROES, 2n ** 63n, 4096, ENOSPC],
          [CMD.CACHE, SIZE, 4096, EINVAL],
        ];
        for (const [type, offset, length, errno] of cases) {
          const data = type === CMD.WRITE ? pattern(length, 9) : undefined;
          const r = await c.request(type, { offset, length, data });
          expectError(c, r, errno);
          // the WRITE payload was consumed: the next request is parsed correctly
          expect((await c.read(0, 512)).length).toBe(512);
        }
        c.destroy();
      });

      it.each([false, true])('A.15-22 requests misaligned to the advertised minimum (4096) → EINVAL (structured %s)', async (structured) => {
        const { c, info } = await open({ exportName: 'aligned', structured });
        expect(info.blockSize?.minimum).toBe(4096);
        const cases: Array<[number, number, number]> = [
          [CMD.READ, 512, 4096],
          [CMD.READ, 0, 100],
          [CMD.READ, 1, 4095],
          [CMD.WRITE, 2048, 4096],
          [CMD.WRITE, 0, 512],
          [CMD.TRIM, 0, 1000],
          [CMD.WRITE_ZEROES, 100, 4096],
          [CMD.CACHE, 4095, 1],
        ];
        for (const [type, offset, length] of cases) {
          const r = await c.request(type, { offset, length, data: type === CMD.WRITE ? pattern(length, 1) : undefined });
          expectError(c, r, EINVAL);
        }
        // aligned requests work
        const d = pattern(8192, 22);
        await c.ok(CMD.WRITE, { offset: 4096, data: d });
        expect((await c.read(4096, 8192)).equals(d)).toBe(true);
        await c.ok(CMD.TRIM, { offset: 4096, length: 4096 });
        await c.ok(CMD.WRITE_ZEROES, { offset: 8192, length: 4096 });
        expect((await c.read(4096, 8192)).equals(Buffer.alloc(8192))).toBe(true);
        c.destroy();
      });

      it.each([false, true])('A.15-23 read-only export: READ_ONLY flag set; WRITE, TRIM, WRITE_ZEROES → EPERM (structured %s)', async (structured) => {
        const { c, info } = await open({ exportName: 'ro', structured });
        const f = info.transmissionFlags;
        expect(f & TF.READ_ONLY).toBe(TF.READ_ONLY);
        expect(f & TF.SEND_TRIM).toBe(0);
        expect(f & TF.SEND_WRITE_ZEROES).toBe(0);
        expect(f & TF.SEND_FAST_ZERO).toBe(0);
        const before = await c.read(0, 8192);
        for (const [type, length] of [[CMD.WRITE, 4096], [CMD.TRIM, 4096], [CMD.WRITE_ZEROES, 4096], [CMD.WRITE, 0]] as const) {
          const r = await c.request(type, { offset: 0, length, data: type === CMD.WRITE ? pattern(length, 5) : undefined });
          expectError(c, r, EPERM);
        }
        expect((await c.read(0, 8192)).equals(before)).toBe(true);
        await c.ok(CMD.FLUSH);
        c.destroy();
      });

      it('A.15-24 unknown command → EINVAL; inapplicable or unknown flags → EINVAL; DF without SEND_DF → EINVAL', async () => {
        const { c, info } = await open();
        expect(info.transmissionFlags & TF.SEND_DF).toBe(0);
        const cases: Array<[string, number, number, number]> = [
          ['command 99', 99, 0, 0],
          ['command 8 (RESIZE, not offered)', 8, 0, 0],
          ['command 0xffff', 0xffff, 0, 4096],
          ['REQ_ONE on READ', CMD.READ, CMD_FLAG.REQ_ONE, 4096],
          ['DF on READ without SEND_DF', CMD.READ, CMD_FLAG.DF, 4096],
          ['NO_HOLE on READ', CMD.READ, CMD_FLAG.NO_HOLE, 4096],
          ['FAST_ZERO on TRIM', CMD.TRIM, CMD_FLAG.FAST_ZERO, 4096],
          ['unknown flag 0x8000 on READ', CMD.READ, 0x8000, 4096],
          ['unknown flag 0x20 on FLUSH', CMD.FLUSH, 0x20, 0],
          ['DF on WRITE', CMD.WRITE, CMD_FLAG.DF, 512],
          ['NO_HOLE on WRITE', CMD.WRITE, CMD_FLAG.NO_HOLE, 512],
        ];
        for (const [what, type, flags, length] of cases) {
          const r = await c.request(type, { flags, offset: 0, length, data: type === CMD.WRITE ? pattern(length, 2) : undefined });
          expect(r.kind, what).toBe('simple');
          expect(replyError(r), what).toBe(EINVAL);
          if (r.kind === 'simple') expect(r.data, what).toBeUndefined();
        }
        expect((await c.read(0, 512)).length).toBe(512);
        c.destroy();
      });

      it('A.15-24 with structured replies the same errors come as ERROR chunks (REQ_ONE on READ, unknown command)', async () => {
        const { c } = await open({ structured: true });
        expectError(c, await c.request(CMD.READ, { flags: CMD_FLAG.REQ_ONE, length: 4096 }), EINVAL);
        expectError(c, await c.request(99), EINVAL);
        expectError(c, await c.request(CMD.READ, { flags: 0x4000, length: 4096 }), EINVAL);
        c.destroy();
      });

      it.each([false, true])('A.15-25 zero-length READ/WRITE/TRIM/WRITE_ZEROES/CACHE do not disconnect (structured %s)', async (structured) => {
        const { c } = await open({ structured });
        for (const type of [CMD.READ, CMD.WRITE, CMD.TRIM, CMD.WRITE_ZEROES, CMD.CACHE]) {
          for (const offset of [0, 4096, SIZE]) {
            const r = await c.request(type, { offset, length: 0, data: type === CMD.WRITE ? Buffer.alloc(0) : undefined });
            expect(r.cookie).toBeDefined();
            if (r.kind === 'simple' && type === CMD.READ && r.error === 0) expect(r.data!.length).toBe(0);
            if (r.kind === 'structured' && replyError(r) === 0) {
              // a zero-length success is a lone NONE (or no data at all)
              for (const ch of r.chunks) expect([CHUNK.NONE, CHUNK.OFFSET_DATA, CHUNK.OFFSET_HOLE]).toContain(ch.type);
              expect(r.chunks[r.chunks.length - 1]!.flags & REPLY_FLAG_DONE).toBe(REPLY_FLAG_DONE);
            }
          }
        }
        expect((await c.read(0, 512)).length).toBe(512);
        expect(c.closed).toBe(false);
        c.destroy();
      });

      // Items 26 and 27 (data survives kill -9) need a separate server process and are covered by the
      // process-level durability tests; here: FLUSH and FUA reach the node before the reply.
      it('A.15-26 FLUSH (SEND_FLUSH) succeeds and reaches node.flush after the writes it covers, before its reply', async () => {
        const { c, info } = await open({ exportName: 'rec' });
        expect(info.transmissionFlags & TF.SEND_FLUSH).toBe(TF.SEND_FLUSH);
        rec.log.length = 0;
        await c.ok(CMD.WRITE, { offset: 0, data: pattern(4096, 26) });
        await c.ok(CMD.WRITE, { offset: 8192, data: pattern(4096, 27) });
        expect(rec.log.filter((r) => r.op === 'flush').length).toBe(0);
        await c.ok(CMD.FLUSH);
        const ops = rec.log.map((r) => r.op);
        expect(ops.filter((o) => o === 'write').length).toBe(2);
        const flushAt = ops.indexOf('flush');
        expect(flushAt).toBeGreaterThan(ops.lastIndexOf('write'));
        expect(rec.log[flushAt]!.done).toBe(true);
        expect(rec.log.filter((r) => r.op === 'write').every((r) => r.done)).toBe(true);
        c.destroy();
      });

      it('A.15-27 WRITE with FUA reaches the node with fua set and has completed when replied', async () => {
        const { c, info } = await open({ exportName: 'rec' });
        expect(info.transmissionFlags & TF.SEND_FUA).toBe(TF.SEND_FUA);
        rec.log.length = 0;
        await c.ok(CMD.WRITE, { offset: 4096, flags: CMD_FLAG.FUA, data: pattern(4096, 27) });
        const w = rec.log.filter((r) => r.op === 'write');
        expect(w.length).toBe(1);
        expect(w[0]).toMatchObject({ offset: 4096, length: 4096, fua: true, done: true });
        await c.ok(CMD.WRITE, { offset: 4096, data: pattern(4096, 28) });
        expect(rec.log.filter((r) => r.op === 'write')[1]!.fua).toBe(false);
        // FUA on write-zeroes and trim is passed down too
        await c.ok(CMD.WRITE_ZEROES, { offset: 0, length: 4096, flags: CMD_FLAG.FUA });
        await c.ok(CMD.TRIM, { offset: 0, length: 4096, flags: CMD_FLAG.FUA });
        expect(rec.log.find((r) => r.op === 'writeZeroes')).toMatchObject({ fua: true, done: true });
        expect(rec.log.find((r) => r.op === 'trim')).toMatchObject({ fua: true, done: true });
        c.destroy();
      });

      it.each([false, true])('A.15-28 WRITE_ZEROES reads back zeros with and without NO_HOLE; FAST_ZERO succeeds or ENOTSUP without altering data (structured %s)', async (structured) => {
        const { c, info } = await open({ structured });
        expect(info.transmissionFlags & TF.SEND_WRITE_ZEROES).toBe(TF.SEND_WRITE_ZEROES);
        const base = 4 * MiB;
        for (const [flags, offset, length] of [
          [0, base, 4096],
          [CMD_FLAG.NO_HOLE, base + 100, 70_000],
          [0, base, 3 * 65536],
          [CMD_FLAG.NO_HOLE, base + 65536, 65536],
          [CMD_FLAG.FUA, base + 7, 9],
        ] as const) {
          const d = pattern(4 * 65536, offset + flags);
          await c.ok(CMD.WRITE, { offset: base, data: d });
          await c.ok(CMD.WRITE_ZEROES, { offset, length, flags });
          const got = await c.read(base, d.length);
          const want = Buffer.from(d);
          want.fill(0, offset - base, offset - base + length);
          expect(got.equals(want)).toBe(true);
        }
        if (info.transmissionFlags & TF.SEND_FAST_ZERO) {
          expect(info.transmissionFlags & TF.SEND_WRITE_ZEROES).toBe(TF.SEND_WRITE_ZEROES);
          const d = pattern(65536, 280);
          await c.ok(CMD.WRITE, { offset: base, data: d });
          const r = await c.request(CMD.WRITE_ZEROES, { offset: base, length: 65536, flags: CMD_FLAG.FAST_ZERO });
          const e = replyError(r);
          expect([0, ENOTSUP]).toContain(e);
          expect((await c.read(base, 65536)).equals(e === 0 ? Buffer.alloc(65536) : d)).toBe(true);
        }
        c.destroy();
      });

      it('A.15-28 FAST_ZERO when not advertised → EINVAL, data unchanged; plain WRITE_ZEROES never ENOTSUP', async () => {
        const { c, info } = await open({ exportName: 'nofz' });
        expect(info.transmissionFlags & TF.SEND_FAST_ZERO).toBe(0);
        expect(info.transmissionFlags & TF.SEND_WRITE_ZEROES).toBe(TF.SEND_WRITE_ZEROES);
        const d = pattern(8192, 281);
        await c.ok(CMD.WRITE, { offset: 0, data: d });
        const r = await c.request(CMD.WRITE_ZEROES, { offset: 0, length: 8192, flags: CMD_FLAG.FAST_ZERO });
        expectError(c, r, EINVAL);
        expect((await c.read(0, 8192)).equals(d)).toBe(true);
        await c.ok(CMD.WRITE_ZEROES, { offset: 0, length: 4096 });
        await c.ok(CMD.WRITE_ZEROES, { offset: 4096, length: 4096, flags: CMD_FLAG.NO_HOLE });
        expect((await c.read(0, 8192)).equals(Buffer.alloc(8192))).toBe(true);
        c.destroy();
      });

      it('A.15-29 structured READ: chunks in range, non-overlapping, full coverage, DONE last, OFFSET_HOLE length 12', async () => {
        const { c } = await open({ structured: true });
        const base = 8 * MiB;
        // data in pages 1 and 3, holes in pages 0, 2 and 4.. (memory node pages are 64 KiB)
        const p1 = pattern(65536, 291);
        const p3 = pattern(65536, 293);
        await c.ok(CMD.WRITE, { offset: base + 65536, data: p1 });
        await c.ok(CMD.WRITE, { offset: base + 3 * 65536, data: p3 });
        for (const [offset, length] of [
          [base, 6 * 65536],
          [base + 100, 5 * 65536 - 300],
          [base + 65536 + 10, 20],
          [base + 65536 - 1, 2],
          [base + 4 * 65536, 65536],
        ] as const) {
          const r = await c.request(CMD.READ, { offset, length });
          expect(r.kind).toBe('structured');
          if (r.kind !== 'structured') return;
          for (const ch of r.chunks) expect(ch.cookie).toBe(r.cookie);
          const { data } = assembleStructuredRead(r.chunks, offset, length);
          const want = Buffer.alloc(6 * 65536);
          p1.copy(want, 65536);
          p3.copy(want, 3 * 65536);
          expect(data.equals(want.subarray(offset - base, offset - base + length))).toBe(true);
        }
        const sparse = await c.request(CMD.READ, { offset: base, length: 6 * 65536 });
        if (sparse.kind !== 'structured') throw new Error('expected structured');
        const holes = sparse.chunks.filter((x) => x.type === CHUNK.OFFSET_HOLE);
        expect(holes.length).toBeGreaterThan(0);
        for (const h of holes) expect(h.length).toBe(12);
        expect(sparse.chunks.filter((x) => x.type === CHUNK.OFFSET_DATA).length).toBeGreaterThan(0);
        c.destroy();
      });

      it('A.15-29 structured READ is never a simple reply, even for early errors', async () => {
        const { c } = await open({ structured: true });
        for (const [offset, length, flags] of [[SIZE, 512, 0], [0, 512, CMD_FLAG.REQ_ONE], [0, 33 * MiB, 0], [SIZE - 1, 2, CMD_FLAG.DF]] as const) {
          const r = await c.request(CMD.READ, { offset, length, flags });
          expect(r.kind).toBe('structured');
          expect(replyError(r)).not.toBe(0);
        }
        c.destroy();
      });

      it('A.15-29 DF → exactly one content chunk (holes sent as data); a 64 KiB DF read works', async () => {
        const { c, info } = await open({ structured: true });
        expect(info.transmissionFlags & TF.SEND_DF).toBe(TF.SEND_DF);
        const base = 12 * MiB;
        const p = pattern(65536, 2929);
        await c.ok(CMD.WRITE, { offset: base + 65536, data: p });
        for (const [offset, length] of [[base, 65536], [base + 32768, 65536], [base, 3 * 65536], [base + 2 * 65536, 65536]] as const) {
          const r = await c.request(CMD.READ, { offset, length, flags: CMD_FLAG.DF });
          expectOk(r);
          if (r.kind !== 'structured') throw new Error('expected structured');
          const { data, dataChunks, holeChunks } = assembleStructuredRead(r.chunks, offset, length);
          expect(dataChunks).toBe(1);
          expect(holeChunks).toBe(0);
          const want = Buffer.alloc(4 * 65536);
          p.copy(want, 65536);
          expect(data.equals(want.subarray(offset - base, offset - base + length))).toBe(true);
        }
        // a DF read too large to send unfragmented → EOVERFLOW (75), connection usable
        expectError(c, await c.request(CMD.READ, { offset: 0, length: 32 * MiB + 1, flags: CMD_FLAG.DF }), EOVERFLOW);
        expect((await c.read(base, 4096, CMD_FLAG.DF)).length).toBe(4096);
        c.destroy();
      });

      it('A.15-30 structured READ error (injected EIO) → ERROR/ERROR_OFFSET chunk with DONE, errno 5, message ≤ 4096', async () => {
        const { c } = await open({ exportName: 'faulty', structured: true });
        await c.ok(CMD.WRITE, { offset: 0, data: pattern(4 * 65536, 30) }); // data around the fault, not holes
        for (const [offset, length] of [[FAULT_AT, 4096], [FAULT_AT - 4096, 16384], [0, 4 * 65536], [FAULT_AT + 4095, 1]] as const) {
          for (const flags of [0, CMD_FLAG.DF]) {
            const r = await c.request(CMD.READ, { offset, length, flags });
            expect(r.kind).toBe('structured');
            if (r.kind !== 'structured') return;
            expectErrorChunk(r, EIO);
            // the chunks before the error obey the read rules (no DONE on them, within the request)
            r.chunks.slice(0, -1).forEach((ch) => expect(ch.flags & REPLY_FLAG_DONE).toBe(0));
            const ec = errorChunkOf(r);
            if (ec.type === CHUNK.ERROR_OFFSET) {
              const off = Number(ec.payload.readBigUInt64BE(ec.length - 8));
              expect(off).toBeGreaterThanOrEqual(offset);
              expect(off).toBeLessThan(offset + length);
            }
          }
        }
        // the connection stays usable; reads beside the fault still work
        expect((await c.read(0, 4096)).equals(pattern(4 * 65536, 30).subarray(0, 4096))).toBe(true);
        c.destroy();
      });

      it('A.15-31 simple READ error → 16-byte header with error 5 and no payload; connection usable', async () => {
        const { c } = await open({ exportName: 'faulty' });
        c.sendRaw(encodeRequest(0, CMD.READ, 31n, FAULT_AT, 4096));
        c.sendRaw(encodeRequest(0, CMD.FLUSH, 32n, 0, 0));
        // exactly two 16-byte headers (in either order), no payload between or after them
        const b = await c.readExact(32);
        const headers = [b.subarray(0, 16), b.subarray(16, 32)].map((h) => ({
          magic: h.readUInt32BE(0), error: h.readUInt32BE(4), cookie: h.readBigUInt64BE(8),
        })).sort((x, y) => Number(x.cookie - y.cookie));
        expect(headers).toEqual([
          { magic: SIMPLE_REPLY_MAGIC, error: EIO, cookie: 31n },
          { magic: SIMPLE_REPLY_MAGIC, error: 0, cookie: 32n },
        ]);
        expect(c.buffered).toBe(0);
        expect((await c.read(0, 4096)).length).toBe(4096);
        c.destroy();
      });

      it('A.15-32 BLOCK_STATUS without a selected context → EINVAL (simple and structured)', async () => {
        const a = await open();
        expectError(a.c, await a.c.request(CMD.BLOCK_STATUS, { offset: 0, length: 4096 }), EINVAL);
        expect((await a.c.read(0, 512)).length).toBe(512);
        a.c.destroy();
        const b = await open({ structured: true });
        expectError(b.c, await b.c.request(CMD.BLOCK_STATUS, { offset: 0, length: 4096 }), EINVAL);
        b.c.destroy();
      });

      it('A.15-32 BLOCK_STATUS: one chunk per context, ≥1 descriptor, lengths > 0, REQ_ONE, beyond end → EINVAL', async () => {
        const { c, info } = await open({ structured: true, metaContexts: ['base:allocation'] });
        expect(info.contexts.size).toBe(1);
        const [id] = [...info.contexts.keys()];
        const base = 16 * MiB;
        await c.ok(CMD.WRITE, { offset: base + 65536, data: pattern(2 * 65536, 32) });
        for (const [offset, length, flags] of [
          [base, 8 * 65536, 0],
          [base, 8 * 65536, CMD_FLAG.REQ_ONE],
          [base + 1, 1, 0],
          [base + 65535, 2, CMD_FLAG.REQ_ONE],
          [0, SIZE, 0],
          [SIZE - 512, 512, 0],
          [base + 65536, 65536, CMD_FLAG.REQ_ONE],
        ] as const) {
          const r = await c.request(CMD.BLOCK_STATUS, { offset, length, flags });
          expectOk(r);
          if (r.kind !== 'structured') throw new Error('expected structured');
          expect(r.chunks.length).toBe(1);
          expect(r.chunks[0]!.flags & REPLY_FLAG_DONE).toBe(REPLY_FLAG_DONE);
          const { contextId, descriptors } = blockStatusDescriptors(r.chunks[0]!);
          expect(contextId).toBe(id);
          expect(descriptors.length).toBeGreaterThanOrEqual(1);
          for (const [len, fl] of descriptors) {
            expect(len).toBeGreaterThan(0);
            expect(fl & ~(STATE_HOLE | STATE_ZERO)).toBe(0);
          }
          const firsts = descriptors.slice(0, -1).reduce((s, [len]) => s + len, 0);
          expect(firsts).toBeLessThan(length);
          if (flags & CMD_FLAG.REQ_ONE) {
            expect(descriptors.length).toBe(1);
            expect(descriptors[0]![0]).toBeLessThanOrEqual(length);
          }
        }
        for (const [offset, length] of [[SIZE, 512], [SIZE - 512, 1024], [0, 0xffffffff]] as const) {
          expectError(c, await c.request(CMD.BLOCK_STATUS, { offset, length }), EINVAL);
        }
        c.destroy();
      });

      it('A.15-32 descriptors after TRIM / WRITE_ZEROES report HOLE/ZERO consistently with reads', async () => {
        const { c } = await open({ structured: true, metaContexts: ['base:allocation'] });
        const base = 20 * MiB;
        const len = 16 * 65536;
        await c.ok(CMD.WRITE, { offset: base, data: pattern(len, 320) });
        await c.ok(CMD.TRIM, { offset: base + 2 * 65536, length: 2 * 65536 });
        await c.ok(CMD.WRITE_ZEROES, { offset: base + 5 * 65536, length: 65536 });
        await c.ok(CMD.WRITE_ZEROES, { offset: base + 7 * 65536, length: 65536, flags: CMD_FLAG.NO_HOLE });
        await c.ok(CMD.WRITE_ZEROES, { offset: base + 9 * 65536 + 512, length: 4096 });
        await c.ok(CMD.TRIM, { offset: base + 11 * 65536 + 1024, length: 1024 });
        const data = await c.read(base, len);
        let sawZero = false;
        for (const reqOne of [false, true]) {
          let at = base;
          while (at < base + len) {
            const r = await c.request(CMD.BLOCK_STATUS, { offset: at, length: base + len - at, flags: reqOne ? CMD_FLAG.REQ_ONE : 0 });
            expectOk(r);
            if (r.kind !== 'structured') throw new Error('expected structured');
            const { descriptors } = blockStatusDescriptors(r.chunks[0]!);
            for (const [n, fl] of descriptors) {
              const end = Math.min(at + n, base + len);
              if (fl & STATE_ZERO) {
                sawZero = true;
                expect(data.subarray(at - base, end - base).equals(Buffer.alloc(end - at))).toBe(true);
              }
              // HOLE without ZERO is allowed (contents undefined) but a memory node always zeroes holes
              if (fl & STATE_HOLE) expect(fl & STATE_ZERO).toBe(STATE_ZERO);
              at = end;
            }
          }
        }
        expect(sawZero).toBe(true);
        // the trimmed and zeroed whole pages read as zeros and are reported as such
        const r = await c.request(CMD.BLOCK_STATUS, { offset: base + 2 * 65536, length: 2 * 65536, flags: CMD_FLAG.REQ_ONE });
        if (r.kind !== 'structured') throw new Error('expected structured');
        expect(blockStatusDescriptors(r.chunks[0]!).descriptors[0]![1] & STATE_ZERO).toBe(STATE_ZERO);
        c.destroy();
      });

      it('A.15-33 a 32 MiB WRITE and READ work (advertised maximum ≥ 32 MiB)', async () => {
        const { c, info } = await open();
        expect(info.blockSize!.maximum).toBeGreaterThanOrEqual(32 * MiB);
        const d = pattern(32 * MiB, 33);
        await c.ok(CMD.WRITE, { offset: 16 * MiB, data: d });
        expect((await c.read(16 * MiB, 32 * MiB)).equals(d)).toBe(true);
        c.destroy();
        const s = await open({ structured: true });
        const got = await s.c.read(16 * MiB, 32 * MiB);
        expect(got.equals(d)).toBe(true);
        // DF over the portable maximum may be refused with EOVERFLOW; 32 MiB itself works
        const df = await s.c.request(CMD.READ, { offset: 16 * MiB, length: 32 * MiB, flags: CMD_FLAG.DF });
        expect([0, EOVERFLOW]).toContain(replyError(df));
        s.c.destroy();
      });

      it('A.15-33 a WRITE of 32 MiB + 1 is refused cleanly (error reply or disconnect)', async () => {
        const { c } = await open();
        const n = 32 * MiB + 1;
        const cookie = c.send(CMD.WRITE, { offset: 0, length: n, data: Buffer.alloc(n, 0x33) });
        let outcome: 'eof' | number;
        try {
          outcome = replyError(await c.readReply(cookie, 10_000));
        } catch {
          outcome = 'eof';
        }
        if (outcome === 'eof') {
          await c.expectEof();
        } else {
          expect(outcome).not.toBe(0);
          expect((await c.read(0, 512)).length).toBe(512);
        }
        // the server is fine
        const { c: d } = await open();
        expect((await d.read(0, 512)).length).toBe(512);
        c.destroy();
        d.destroy();
      });

      it.each([false, true])('A.15-33 READ over the maximum payload is refused without a disconnect; TRIM/WRITE_ZEROES/BLOCK_STATUS over it work (structured %s)', async (structured) => {
        const { c } = await open({ structured, metaContexts: structured ? ['base:allocation'] : undefined });
        const big = 48 * MiB;
        const r = await c.request(CMD.READ, { offset: 0, length: 32 * MiB + 1 });
        expect([EINVAL, EOVERFLOW]).toContain(replyError(r));
        await c.ok(CMD.WRITE, { offset: 0, data: pattern(4096, 333) });
        for (const [type, flags] of [[CMD.TRIM, 0], [CMD.WRITE_ZEROES, 0], [CMD.WRITE_ZEROES, CMD_FLAG.NO_HOLE], [CMD.CACHE, 0]] as const) {
          const rr = await c.request(type, { offset: 0, length: big, flags });
          expect([0, EINVAL, EOVERFLOW]).toContain(replyError(rr));
          expect(c.closed).toBe(false);
        }
        expect((await c.read(0, 4096)).equals(Buffer.alloc(4096))).toBe(true);
        if (structured) {
          const bs = await c.request(CMD.BLOCK_STATUS, { offset: 0, length: big });
          expect([0, EINVAL, EOVERFLOW]).toContain(replyError(bs));
        }
        expect((await c.read(0, 512)).length).toBe(512);
        c.destroy();
      });

      it('A.15-34 DISC: outstanding writes complete, no reply to DISC, socket closed, data durable', async () => {
        const { c } = await open({ exportName: 'gated' });
        gated.log.length = 0;
        gate.close();
        try {
          const d = pattern(65536, 34);
          const w = c.send(CMD.WRITE, { offset: 65536, data: d });
          await gate.waitEntered(gate.entered + 1);
          c.sendRaw(encodeRequest(0, CMD.DISC, 999n, 0, 0));
          gate.open();
          const r = await c.readReply(w);
          expectOk(r);
          // no reply to DISC: only EOF follows
          expect((await c.expectEof()).length).toBe(0);
          const ops = gated.log.map((x) => x.op);
          expect(ops.lastIndexOf('flush')).toBeGreaterThan(ops.indexOf('write'));
          const { c: c2 } = await open({ exportName: 'gated' });
          expect((await c2.read(65536, 65536)).equals(d)).toBe(true);
          c2.destroy();
        } finally {
          gate.open();
        }
      });

      it('A.15-35 multi-conn: write on A (replied), flush on B, read on C sees it', async () => {
        const conns = await Promise.all([open(), open({ structured: true }), open()]);
        for (const { info } of conns) expect(info.transmissionFlags & TF.CAN_MULTI_CONN).toBe(TF.CAN_MULTI_CONN);
        const [a, b, c] = conns.map((x) => x.c) as [RawClient, RawClient, RawClient];
        const d = pattern(1 * MiB, 35);
        await a.ok(CMD.WRITE, { offset: 30 * MiB, data: d });
        await b.ok(CMD.FLUSH);
        expect((await c.read(30 * MiB, MiB)).equals(d)).toBe(true);
        await a.ok(CMD.WRITE, { offset: 30 * MiB, flags: CMD_FLAG.FUA, data: pattern(4096, 350) });
        expect((await b.read(30 * MiB, 4096)).equals(pattern(4096, 350))).toBe(true);
        for (const x of [a, b, c]) x.destroy();
      });

      it('A.15-36 transmission flag sanity: HAS_FLAGS; SEND_DF only with structured replies; SEND_FAST_ZERO only with SEND_WRITE_ZEROES', async () => {
        const known = 0x0fff & ~TF.SEND_RESIZE; // RESIZE is not implemented
        for (const name of EXPORT_NAMES) {
          for (const mode of ['go', 'go-structured', 'export-name', 'export-name-structured'] as const) {
            const structured = mode.endsWith('structured');
            const { c, info } = await open({ exportName: name, structured, useExportName: mode.startsWith('export-name') });
            const f = info.transmissionFlags;
            expect(f & TF.HAS_FLAGS).toBe(TF.HAS_FLAGS);
            expect(f & ~known).toBe(0);
            expect((f & TF.SEND_DF) !== 0).toBe(structured);
            if (f & TF.SEND_FAST_ZERO) expect(f & TF.SEND_WRITE_ZEROES).toBe(TF.SEND_WRITE_ZEROES);
            if (f & TF.READ_ONLY) expect(f & (TF.SEND_TRIM | TF.SEND_WRITE_ZEROES | TF.SEND_FAST_ZERO)).toBe(0);
            c.destroy();
          }
        }
      });
    });

    // =================================================================================================
    describe('A.15-37 server shutdown with requests in flight', () => {
      async function gatedServer() {
        const g = new Gate();
        const node = hookNode(new MemoryNode(SMALL), { gate: g, gateOps: ['read', 'write'] });
        const T = await startServer({ handshakeTimeoutMs: 10_000, exports: [{ name: '', node: completeNode(node) }] });
        return { T, g, node };
      }

      it.each([false, true])('A.15-37 in-flight requests complete, requests arriving during shutdown get ESHUTDOWN, then close (structured %s)', async (structured) => {
        const { T, g, node } = await gatedServer();
        try {
          const { c } = await open({ structured }, T.path);
          await c.ok(CMD.WRITE, { offset: 0, data: pattern(4096, 37) });
          g.close();
          const a = c.send(CMD.READ, { offset: 0, length: 4096 });
          const d = pattern(4096, 370);
          const b = c.send(CMD.WRITE, { offset: 8192, data: d });
          await g.waitEntered(2);
          const down = T.srv.shutdown();
          let downDone = false;
          void down.then(() => (downDone = true));
          const late = c.send(CMD.READ, { offset: 0, length: 4096 });
          const lateW = c.send(CMD.WRITE, { offset: 0, data: pattern(512, 1) });
          expectError(c, await c.readReply(late), ESHUTDOWN);
          expectError(c, await c.readReply(lateW), ESHUTDOWN);
          expect(downDone).toBe(false);
          g.open();
          const ra = await c.readReply(a);
          expect(readReplyData(ra, 0, 4096).equals(pattern(4096, 37))).toBe(true);
          expectOk(await c.readReply(b));
          expect((await c.expectEof()).length).toBe(0);
          await withTimeout(down, 5000, 'shutdown');
          // the data of the in-flight write was written and flushed
          const ops = node.log.map((x) => x.op);
          expect(ops.lastIndexOf('flush')).toBeGreaterThan(ops.lastIndexOf('write'));
          expect(node.log.filter((x) => x.op === 'write' && x.offset === 0 && x.length === 512).length).toBe(0);
        } finally {
          g.open();
          await T.close();
        }
      });

      it('A.15-37 shutdown finishes when an incomplete WRITE follows a request answered ESHUTDOWN', async () => {
        const { T, g } = await gatedServer();
        try {
          const { c } = await open({}, T.path);
          g.close();
          const a = c.send(CMD.READ, { offset: 0, length: 4096 });
          await g.waitEntered(1);
          const down = T.srv.shutdown();
          c.track(2000n, CMD.READ, 512);
          // one segment: a READ, then a WRITE header announcing 4096 bytes of which only 100 come
          c.sendRaw(Buffer.concat([encodeRequest(0, CMD.READ, 2000n, 0, 512), encodeRequest(0, CMD.WRITE, 2001n, 0, 4096), Buffer.alloc(100)]));
          expectError(c, await c.readReply(2000n), ESHUTDOWN);
          g.open();
          expectOk(await c.readReply(a));
          expect((await c.expectEof()).length).toBe(0);
          await withTimeout(down, 5000, 'shutdown');
        } finally {
          g.open();
          await T.close();
        }
      });

      it('A.15-37 shutdown finishes when more requests are queued than may run at once', async () => {
        const { T, g } = await gatedServer();
        try {
          const { c } = await open({}, T.path);
          await waitConnections(T.srv, 1);
          g.close();
          const cookies: bigint[] = [];
          const burst: Buffer[] = [];
          for (let i = 0; i < 100; i++) {
            const cookie = BigInt(1000 + i);
            cookies.push(cookie);
            c.track(cookie, CMD.READ, 512);
            burst.push(encodeRequest(0, CMD.READ, cookie, i * 512, 512));
          }
          c.sendRaw(Buffer.concat(burst));
          await g.waitEntered(64); // the server runs at most 64 at once; the rest wait in its queue
          const down = T.srv.shutdown();
          g.open();
          let ok = 0;
          let shut = 0;
          for (;;) {
            let r: Reply;
            try {
              r = await c.readReply();
            } catch {
              break;
            }
            const e = replyError(r);
            if (e === 0) ok++;
            else {
              expect(e).toBe(ESHUTDOWN);
              shut++;
            }
          }
          await c.expectEof();
          expect(ok).toBeGreaterThanOrEqual(64);
          expect(ok + shut).toBeLessThanOrEqual(100);
          await withTimeout(down, 5000, 'shutdown with a queue of requests');
        } finally {
          g.open();
          await T.close();
        }
      });
    });
  });
}
