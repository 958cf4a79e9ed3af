/**
 * A primary stand-in for the secondary's tests: opens the pair link on a secondary's socket,
 * says hello, and opens the data connection (a plain NbdClient) once welcomed.
 */
import net from 'node:net';
import { randomUUID } from 'node:crypto';
import { NbdClient } from '../../src/nbd/client.js';
import { openExtension, OPT_BLKREP_PAIR_LINK } from '../../src/nbd/option-takeover.js';
import { freshTuple, type GenerationTuple } from '../../src/pair/generations.js';
import { replicaWriterExport } from '../../src/pair/data-token.js';
import { PAIR_LINK_VERSION, PairChannel, type PairMessage, type RequestWithoutSeq } from '../../src/pair/messages.js';
import { unixUri } from '../support/spawn.js';

export function connectUnix(socket: string): Promise<{ stream: net.Socket; peer: string }> {
  return new Promise((resolve, reject) => {
    const s = net.connect(socket, () => resolve({ stream: s, peer: socket }));
    s.once('error', reject);
  });
}

export interface LinkOptions {
  exportName?: string;
  size: number;
  gi?: GenerationTuple;
  protocol?: 'sync' | 'async';
  role?: 'primary' | 'secondary';
  /** the primary's node id (default: a new one per link) */
  nodeId?: string;
  /** answer the secondary's pings as a live primary does (default: silent, as a dead one) */
  answerPings?: boolean;
  /** hello fields set as given, over the ones above (a hostile or broken primary's) */
  helloFields?: Record<string, unknown>;
}

export interface ScriptedPrimary {
  channel: PairChannel;
  answer: PairMessage;
  /** one-way messages the secondary sent (event, demote, …) */
  received: PairMessage[];
  /** the hello's node id */
  nodeId: string;
  /** CHECKPOINT n; `id`/`nodeId`: the request's identity as a primary of this version sends it (absent: an older primary's) */
  checkpoint(n: number, timeoutMs?: number, who?: { id?: string; nodeId?: string }): Promise<PairMessage>;
  close(): void;
}

/** Open the link and say hello; resolves with the answer (welcome or refuse). */
export async function openLink(socket: string, o: LinkOptions): Promise<ScriptedPrimary> {
  const exportName = o.exportName ?? '';
  const opened = await openExtension(await connectUnix(socket), OPT_BLKREP_PAIR_LINK, Buffer.from(JSON.stringify({ exportName })));
  const received: PairMessage[] = [];
  const nodeId = o.nodeId ?? randomUUID();
  const channel = new PairChannel(
    opened.connection.stream,
    socket,
    (m, ch) => {
      received.push(m);
      if (o.answerPings && m.type === 'ping' && ch.isOpen) ch.send({ type: 'pong', t: m.t });
    },
    opened.rest,
  );
  const answer = await channel.request<PairMessage>(
    {
      type: 'hello',
      version: PAIR_LINK_VERSION,
      exportName,
      size: o.size,
      protocol: o.protocol ?? 'sync',
      nodeId,
      role: o.role ?? 'primary',
      gi: o.gi ?? freshTuple(),
      epoch: 0,
      diskState: 'UpToDate',
      crashedPrimary: false,
      bitmapBytes: 0,
      ...(o.helloFields as object),
    } as RequestWithoutSeq,
    5000,
  );
  return {
    channel,
    answer,
    received,
    nodeId,
    checkpoint: (n, timeoutMs = 10_000, who = {}) => channel.request<PairMessage>({ type: 'checkpoint', n, ...who }, timeoutMs),
    close: () => channel.close(),
  };
}

export function dataClient(socket: string, exportName = ''): Promise<NbdClient> {
  return NbdClient.connect({ uri: unixUri(socket, exportName), reconnect: false, closeTimeoutMs: 2000 });
}

/** The data connection a welcomed primary writes through: its welcome's writer token (src/pair/data-token.ts). */
export function writerClient(socket: string, link: ScriptedPrimary, exportName = ''): Promise<NbdClient> {
  const token = (link.answer as { dataToken?: unknown }).dataToken;
  if (typeof token !== 'string') throw new Error(`no dataToken in ${JSON.stringify(link.answer)}`);
  return dataClient(socket, replicaWriterExport(exportName, token));
}
