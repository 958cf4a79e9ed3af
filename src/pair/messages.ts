/**
 * The pair link: JSON lines between the two daemons of a replication pair, on a connection
 * opened with blkrep's NBD extension option (src/nbd/option-takeover.ts), so the link shares the
 * replica export's listener, transport and TLS. Each line is one message, at most MAX_LINE bytes.
 *
 * Requests carry `seq` (the sender's counter); the answer carries `re` = that seq. Messages
 * without `seq` are one-way (event, ping).
 *
 *   P → S  hello        who I am, my generations and epoch; S answers welcome or refuse
 *                       (welcome `ordered`: S applies the data connection's writes in arrival
 *                       order, so an async P may pipeline them; absent from older secondaries)
 *                       (welcome.dataToken: the data connection's export is NAME@pair-token=TOKEN,
 *                       data-token.ts; every role change retires it)
 *                       (welcome.resumeFull with action resync-full: S's disk is a partial full
 *                       copy from this very primary at its current generation (state.ts
 *                       fullSyncFrom): a primary whose peer bitmap tracks that copy resumes it)
 *   P → S  checkpoint   checkpoint N (replication.md §2 steps 3–7); S answers done or failed
 *                       (`id`: a nonce per request, `nodeId`: the primary's; S records both with
 *                       the epoch, and answers "committed already" for N <= its epoch only to the
 *                       same request, else failed ERR_PAIR_STATE with its `epoch`. Absent from
 *                       older primaries: S then judges by the link's hello node id, see secondary.ts)
 *   P → S  abort        give up checkpoint N (timeout on P); S answers done (epoch unchanged)
 *   S → P  event        something the HA side must know (case 3/4 of the failure table)
 *   both   ping / pong  liveness on the link (heartbeat backend "link")
 *   S → P  demote       S was promoted: the link closes, the primary must stop forwarding
 *   P → S  bitmap       after a welcome deciding a bitmap resync: the regions S marks for itself
 *                       (an old primary's peer bitmap with its activity log), a page of runs from
 *                       `from`; S answers runs {runs, next} (next null: the last page)
 *   S → P  bitmap       before its welcome, the same for the primary's peer bitmap: a split brain's
 *                       salvage, and a bitmap resync's copies into hidden (CbwFilter.precopy)
 */
import type { Duplex } from 'node:stream';
import { BlkrepError } from '../api/errors.js';
import type { DirtyBitmap } from '../bitmap/dirty-bitmap.js';
import type { GenerationTuple } from './generations.js';

export const PAIR_LINK_VERSION = 1;
/** one message line, newline included */
export const MAX_LINE = 64 * 1024;

export type DiskState = 'UpToDate' | 'Consistent' | 'Outdated' | 'Inconsistent' | 'Failed';

export interface NodeSummary {
  nodeId: string;
  role: 'primary' | 'secondary';
  /** generations as hex strings (64-bit values do not fit a JSON number) */
  gi: GenerationTuple;
  /** last committed epoch */
  epoch: number;
  diskState: DiskState;
  /** this node was a primary and did not stop cleanly (its activity log must be resynced) */
  crashedPrimary: boolean;
  /** bytes this node has marked dirty for its peer since the generations diverged */
  bitmapBytes: number;
  /** the node's name, for the discard-node=NAME split-brain policy (absent: the nodeId) */
  name?: string;
  /** when it last became primary (ms since the epoch), for discard-younger/older-primary; absent/null: never */
  primarySince?: number | null;
  /** the operator marked this node the victim of a split brain (DRBD's --discard-my-data) */
  discardMyData?: boolean;
}

export type PairMessage =
  | ({ type: 'hello'; seq: number; version: number; exportName: string; size: number; protocol: 'sync' | 'async' } & NodeSummary)
  | ({ type: 'welcome'; re: number; version: number; size: number; ordered?: boolean } & NodeSummary & { decision: LinkDecision; dataToken?: string; resumeFull?: boolean })
  | { type: 'refuse'; re: number; code: string; message: string; decision?: LinkDecision }
  | { type: 'checkpoint'; seq: number; n: number; id?: string; nodeId?: string }
  | { type: 'abort'; seq: number; n: number }
  | { type: 'done'; re: number; n: number; epoch: number }
  | { type: 'failed'; re: number; n: number; code: string; message: string; epoch?: number }
  | { type: 'event'; name: string; fields: Record<string, unknown> }
  | { type: 'ping'; t: number }
  | { type: 'pong'; t: number }
  | { type: 'demote'; reason: string }
  | { type: 'bitmap'; seq: number; from: number }
  | { type: 'runs'; re: number; runs: Array<[number, number]>; next: number | null };

/**
 * The largest epoch a peer may say (hello, welcome, DONE, FAILED, an abort's answer): 2^48, a
 * checkpoint a millisecond for 8,900 years. Below it, the next checkpoint number (epoch + 1) and
 * every one after stay safe integers for as long; a peer saying an epoch near 2^53 (hostile,
 * broken, a damaged state restored) stopped the primary's checkpoints for good: N = epoch + 1 was
 * past what a JSON number holds exactly.
 */
export const MAX_EPOCH = 2 ** 48;

/** runs per `runs` page: [offset, length] pairs of up to 2×16 digits fit MAX_LINE */
export const RUNS_PER_PAGE = 1500;

/** what the secondary decided on hello (the generation table, replication.md §5) */
export interface LinkDecision {
  rule: number;
  /** none: in step; resync: primary → secondary by bitmap or full; refuse: split brain, unrelated, wrong direction */
  action: 'none' | 'resync-bitmap' | 'resync-full' | 'refuse';
  explanation: string;
}

export type PairMessageType = PairMessage['type'];

/** a request as request() takes it: any message with a seq, without the seq (distributes over the union) */
export type RequestWithoutSeq = Extract<PairMessage, { seq: number }> extends infer R ? (R extends unknown ? Omit<R, 'seq'> : never) : never;

const TYPES = new Set<string>(['hello', 'welcome', 'refuse', 'checkpoint', 'abort', 'done', 'failed', 'event', 'ping', 'pong', 'demote', 'bitmap', 'runs']);

export function encodeMessage(m: PairMessage): Buffer {
  const line = Buffer.from(JSON.stringify(m) + '\n', 'utf8');
  if (line.length > MAX_LINE) throw new BlkrepError('ERR_PAIR_PROTOCOL', `pair link message "${m.type}" is ${line.length} bytes, over the limit of ${MAX_LINE}`);
  return line;
}

/** Parse one line (without its newline). Throws ERR_PAIR_PROTOCOL naming what is wrong. */
export function decodeMessage(line: string): PairMessage {
  let v: unknown;
  try {
    v = JSON.parse(line);
  } catch {
    throw new BlkrepError('ERR_PAIR_PROTOCOL', `pair link line is not JSON: ${JSON.stringify(line.slice(0, 80))}`);
  }
  if (typeof v !== 'object' || v === null || Array.isArray(v)) throw new BlkrepError('ERR_PAIR_PROTOCOL', 'pair link line is not a JSON object');
  const type = (v as { type?: unknown }).type;
  if (typeof type !== 'string' || !TYPES.has(type)) throw new BlkrepError('ERR_PAIR_PROTOCOL', `pair link message has unknown type ${JSON.stringify(type)}`);
  return v as PairMessage;
}

/**
 * A pair link over a stream: sends messages, delivers received ones in order, and matches
 * answers to requests. Closing (either side, or a protocol error) rejects every pending request
 * with ERR_PAIR_LINK_DOWN and calls onClose once.
 */
export class PairChannel {
  private buffered = '';
  private seq = 0;
  private readonly pending = new Map<number, { resolve: (m: PairMessage) => void; reject: (e: Error) => void; timer: NodeJS.Timeout }>();
  private closed: Error | undefined;
  private readonly closeHandlers: Array<(why: Error) => void> = [];

  constructor(
    readonly stream: Duplex,
    readonly peer: string,
    private readonly onMessage: (m: PairMessage, channel: PairChannel) => void,
    rest: Buffer = Buffer.alloc(0),
  ) {
    stream.setEncoding?.('utf8');
    stream.on('data', (chunk: string | Buffer) => this.onData(typeof chunk === 'string' ? chunk : chunk.toString('utf8')));
    stream.on('end', () => this.close(new BlkrepError('ERR_PAIR_LINK_DOWN', `pair link to ${peer} closed by the peer`)));
    stream.on('close', () => this.close(new BlkrepError('ERR_PAIR_LINK_DOWN', `pair link to ${peer} closed`)));
    stream.on('error', (err) => this.close(new BlkrepError('ERR_PAIR_LINK_DOWN', `pair link to ${peer} failed: ${err.message}`, { cause: err })));
    if (rest.length) queueMicrotask(() => this.onData(rest.toString('utf8')));
    stream.resume();
  }

  /** A `ping` (the peer answers `pong`), when the channel is open; false when it is not or the send failed. */
  sendPing(): boolean {
    if (!this.isOpen) return false;
    try {
      this.send({ type: 'ping', t: Date.now() });
      return true;
    } catch {
      return false;
    }
  }

  get isOpen(): boolean {
    return this.closed === undefined;
  }

  /** Call `fn` once the channel closes (at once if it is closed); the function returned takes it back. */
  onClose(fn: (why: Error) => void): () => void {
    if (this.closed) {
      fn(this.closed);
      return () => {};
    }
    this.closeHandlers.push(fn);
    return () => {
      const i = this.closeHandlers.indexOf(fn);
      if (i >= 0) this.closeHandlers.splice(i, 1);
    };
  }

  /** one-way message or an answer (with `re`) */
  send(m: PairMessage): void {
    if (this.closed) throw this.closed;
    this.stream.write(encodeMessage(m));
  }

  /** a request: `seq` is filled in; resolves with the answer whose `re` matches */
  request<T extends PairMessage>(m: RequestWithoutSeq, timeoutMs: number): Promise<T> {
    if (this.closed) return Promise.reject(this.closed);
    const seq = ++this.seq;
    return new Promise<T>((resolve, reject) => {
      const timer = setTimeout(() => {
        this.pending.delete(seq);
        reject(new BlkrepError('ERR_PAIR_TIMEOUT', `pair link to ${this.peer}: no answer to "${m.type}" within ${timeoutMs} ms`, { details: { type: m.type, timeoutMs } }));
      }, timeoutMs);
      this.pending.set(seq, { resolve: resolve as (m: PairMessage) => void, reject, timer });
      this.send({ ...m, seq } as PairMessage);
    });
  }

  close(why: Error = new BlkrepError('ERR_PAIR_LINK_DOWN', `pair link to ${this.peer} closed`)): void {
    if (this.closed) return;
    this.closed = why;
    for (const [, p] of this.pending) {
      clearTimeout(p.timer);
      p.reject(why);
    }
    this.pending.clear();
    this.stream.destroy();
    for (const fn of this.closeHandlers.splice(0)) fn(why);
  }

  private onData(text: string): void {
    this.buffered += text;
    for (;;) {
      const nl = this.buffered.indexOf('\n');
      if (nl < 0) break;
      const line = this.buffered.slice(0, nl);
      this.buffered = this.buffered.slice(nl + 1);
      let m: PairMessage;
      try {
        m = decodeMessage(line);
      } catch (err) {
        this.close(err as Error);
        return;
      }
      const re = (m as { re?: unknown }).re;
      if (typeof re === 'number' && this.pending.has(re)) {
        const p = this.pending.get(re)!;
        this.pending.delete(re);
        clearTimeout(p.timer);
        p.resolve(m);
      } else {
        this.onMessage(m, this);
      }
      if (this.closed) return;
    }
    if (Buffer.byteLength(this.buffered) > MAX_LINE) this.close(new BlkrepError('ERR_PAIR_PROTOCOL', `pair link line from ${this.peer} is over ${MAX_LINE} bytes`));
  }
}

/** One `runs` page of a bitmap's dirty runs from `from` (the answer to a `bitmap` request). */
export function runsPage(b: DirtyBitmap | undefined, from: number): { runs: Array<[number, number]>; next: number | null } {
  const start = Number.isSafeInteger(from) && from >= 0 ? from : 0;
  if (!b || start >= b.size) return { runs: [], next: null };
  const runs: Array<[number, number]> = [];
  for (const r of b.dirtyRuns(start, b.size - start)) {
    if (runs.length === RUNS_PER_PAGE) return { runs, next: r.offset };
    runs.push([r.offset, r.length]);
  }
  return { runs, next: null };
}

/** Every run the peer's bitmap marks, page by page (`bitmap` requests), each checked inside `size`. */
export async function fetchRuns(channel: PairChannel, size: number, timeoutMs: number): Promise<Array<{ offset: number; length: number }>> {
  const out: Array<{ offset: number; length: number }> = [];
  for (let from: number | null = 0; from !== null; ) {
    const page: PairMessage = await channel.request<PairMessage>({ type: 'bitmap', from }, timeoutMs);
    if (page.type !== 'runs' || !Array.isArray(page.runs)) throw new BlkrepError('ERR_PAIR_PROTOCOL', `${channel.peer} answered "bitmap" with "${page.type}"`);
    for (const run of page.runs) {
      const [offset, length] = Array.isArray(run) ? run : [];
      if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset! < 0 || length! <= 0 || offset! + length! > size) {
        throw new BlkrepError('ERR_PAIR_PROTOCOL', `${channel.peer}: bitmap run ${JSON.stringify(run)} is not inside the disk (${size} bytes)`);
      }
      out.push({ offset: offset!, length: length! });
    }
    if (page.next !== null && (!Number.isSafeInteger(page.next) || page.next <= from)) throw new BlkrepError('ERR_PAIR_PROTOCOL', `${channel.peer}: the bitmap page from ${from} goes on at ${JSON.stringify(page.next)}`);
    from = page.next;
  }
  return out;
}
