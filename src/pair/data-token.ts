/**
 * The replica export's writer token: a fencing token per pair link (replication.md §6, "a stale
 * primary can never write to the new primary").
 *
 * A welcome on the pair link mints a token (128 random bits, hex) and says it to the primary
 * (`welcome.dataToken`). The primary opens its data connection to the hidden export
 * `NAME@pair-token=TOKEN` (replicaWriterExport); that export is the only way to write the replica.
 * The export named NAME itself is read-only while a link holds it, so a plain NBD client
 * (nbdinfo, qemu-nbd, qemu-img) can read the replica, and a writer without the token gets EPERM.
 *
 * Every role change (the link closes, a new link is welcomed, promotion, the daemon stops)
 * retires the token. Then:
 *   - a connection that holds the old token keeps its socket, but each WRITE, WRITE_ZEROES and
 *     TRIM on it fails with EPERM before anything is written (ERR_PAIR_FENCED; reads still work);
 *   - a new connection with the old token is refused at NBD_OPT_GO/INFO with
 *     NBD_REP_ERR_POLICY "stale pair token …" (EXPORT_NAME: the connection is closed);
 *   - after FENCE_LINGER_MS the retired export is removed and its connections are closed.
 * `--accept-plain-primary` keeps NAME writable without a token: that option says the operator
 * wants a plain NBD primary, which has no pair link to get a token from.
 */
import { randomBytes } from 'node:crypto';
import type { BlockNode, WriteOptions, ZeroOptions } from '../api/block.js';
import { BlkrepError } from '../api/errors.js';
import { Filter } from '../block/filter.js';
import type { NbdServer } from '../nbd/server.js';
import type { WriteGate } from './write-gate.js';

export const TOKEN_INFIX = '@pair-token=';
/** how long a retired writer export answers "stale" before it is removed with its connections */
export const FENCE_LINGER_MS = 30_000;
/**
 * Requests the writer export runs at once on its connection, and the primary puts on the wire to
 * it (primary.ts); the NBD default is 64 both ways. 128: an async primary's secondary sets the
 * pace of a full queue, and each first touch of a cluster waits for the hidden disk's
 * group-committed writeback cycle, so more writes in flight share each cycle (quiet machine,
 * bench/pair async 4 KiB random QD32: 8608 / 8829 IOPS at 64, 13534 / 10414 at 128, 13061 / 12829
 * at 192; the secondary's peak RSS 112–114, 127–131, 145–155 MiB: src/pair/README.md "Where the
 * time goes", session 14).
 */
export const REPLICA_MAX_INFLIGHT = 128;

export function mintDataToken(): string {
  return randomBytes(16).toString('hex');
}

/** the hidden export a primary holding `token` writes the replica through */
export function replicaWriterExport(exportName: string, token: string): string {
  return `${exportName}${TOKEN_INFIX}${token}`;
}

/**
 * Writes pass only while `stale()` says nothing; else EPERM, nothing written. The check is made
 * when `gate` (the copy-before-write filter's) is open, in the same tick as the write enters it:
 * a write cannot pass the check, wait behind a held gate (a failover holds it after retiring the
 * token), and land in the promoted disk afterwards.
 */
export class FencedNode extends Filter {
  readonly driver = 'pair-fence';
  constructor(
    next: BlockNode,
    private readonly stale: () => string | undefined,
    private readonly gate?: WriteGate,
  ) {
    super(next);
  }
  private async pass<T>(what: string, offset: number, length: number, op: () => Promise<T>): Promise<T> {
    while (this.gate?.isHeld) {
      await this.gate.enter();
      this.gate.leave();
    }
    const why = this.stale();
    if (why !== undefined) {
      throw new BlkrepError('ERR_PAIR_FENCED', `${what} of ${length} bytes at ${offset} refused: ${why}`, { errno: 'EPERM', details: { offset, length } });
    }
    return op();
  }
  override write(offset: number, data: Buffer, o?: WriteOptions): Promise<void> {
    return this.pass('write', offset, data.length, () => this.next.write(offset, data, o));
  }
  override writeZeroes(offset: number, length: number, o?: ZeroOptions): Promise<void> {
    return this.pass('write-zeroes', offset, length, () => this.next.writeZeroes(offset, length, o));
  }
  override trim(offset: number, length: number, o?: WriteOptions): Promise<void> {
    return this.pass('trim', offset, length, () => this.next.trim(offset, length, o));
  }
  /** the node under it belongs to the secondary */
  override close(): Promise<void> {
    return Promise.resolve();
  }
}

/** The writer exports of one replica export: the current token's, and retired ones lingering. */
export class ReplicaWriters {
  private current: string | undefined;
  private readonly retired = new Map<string, { why: string; timer: NodeJS.Timeout }>();

  constructor(
    private readonly server: NbdServer,
    private readonly exportName: string,
    /** the node a new writer writes through: its own order chain, `ordered` as its primary's protocol says (CbwFilter.writer) */
    private readonly writerNode: (ordered: boolean) => BlockNode,
    private readonly gate: WriteGate | undefined,
    private readonly minimumBlockSize: number | undefined,
  ) {}

  get token(): string | undefined {
    return this.current;
  }

  /**
   * A new link was welcomed: retire the old token, serve a new one. `ordered`: the replica applies
   * this writer's writes in arrival order (an async primary); its order chain is its own.
   */
  issue(peer: string, ordered: boolean, onAdmit?: () => void): string {
    this.retire(`a new pair link (from ${peer}) took the replica export`);
    const token = mintDataToken();
    this.current = token;
    const name = replicaWriterExport(this.exportName, token);
    this.server.addExport({
      name,
      node: new FencedNode(this.writerNode(ordered), () => (this.current === token ? undefined : this.staleWhy(token)), this.gate),
      hidden: true,
      maxInflight: REPLICA_MAX_INFLIGHT,
      // the token is the writer's credential: logs, status and metrics show it redacted
      shownName: `${this.exportName}${TOKEN_INFIX}…`,
      admit: () => {
        if (this.current !== token) return this.staleWhy(token);
        onAdmit?.();
        return undefined;
      },
      description: `replica writer of "${this.exportName}" for the primary on the pair link from ${peer}`,
      ...(this.minimumBlockSize === undefined ? {} : { minimumBlockSize: this.minimumBlockSize }),
    });
    return token;
  }

  /** a role change: the current token stops writing now */
  retire(why: string): void {
    const token = this.current;
    if (token === undefined) return;
    this.current = undefined;
    const timer = setTimeout(() => this.drop(token, why), FENCE_LINGER_MS);
    timer.unref?.();
    this.retired.set(token, { why, timer });
  }

  /** the daemon stops (or the secondary closes): every writer export goes, with its connections */
  close(why: string): void {
    this.retire(why);
    for (const [token, r] of [...this.retired]) {
      clearTimeout(r.timer);
      this.drop(token, why);
    }
  }

  private staleWhy(token: string): string {
    const why = this.retired.get(token)?.why ?? 'the pair link that issued it is gone';
    return `stale pair token for export "${this.exportName}": ${why}; a primary writes the replica only with the token of its current pair link`;
  }

  private drop(token: string, why: string): void {
    this.retired.delete(token);
    this.server.removeExport(replicaWriterExport(this.exportName, token), `stale pair token: ${why}`);
  }
}
