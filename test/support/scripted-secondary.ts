/**
 * A secondary stand-in for the primary's tests: an NBD server in the test process over a memory
 * disk, whose pair link option answers each message as the test's script says (a hostile or
 * broken secondary, or one that misbehaves only when told to). The primary's data connection
 * writes the export '' (a welcome without dataToken) or NAME@pair-token=… if the script's welcome
 * names a token and the test adds that export.
 */
import { join } from 'node:path';
import type { Duplex } from 'node:stream';
import { MemoryNode } from '../../src/block/memory.js';
import { completeNode } from '../../src/block/node.js';
import { defaultTransports } from '../../src/engine/default-transports.js';
import { NbdServer } from '../../src/nbd/server.js';
import { OPT_BLKREP_PAIR_LINK } from '../../src/nbd/option-takeover.js';
import { freshTuple } from '../../src/pair/generations.js';
import { PAIR_LINK_VERSION, PairChannel, type LinkDecision, type NodeSummary, type PairMessage } from '../../src/pair/messages.js';
import { unixUri } from './spawn.js';

export type SecondaryScript = (m: PairMessage, ch: PairChannel) => void;

export interface ScriptedSecondary {
  uri: string;
  socket: string;
  /** every message the primaries sent, in order */
  received: PairMessage[];
  /** the replica's bytes */
  disk: MemoryNode;
  close(): Promise<void>;
}

export async function scriptedSecondary(dir: string, size: number, script: SecondaryScript): Promise<ScriptedSecondary> {
  const received: PairMessage[] = [];
  const disk = new MemoryNode(size);
  const server = new NbdServer({
    exports: [{ name: '', node: completeNode(disk) }],
    optionExtensions: new Map([
      [
        OPT_BLKREP_PAIR_LINK,
        {
          name: 'pair link',
          accept: () => (stream: Duplex, rest: Buffer) => {
            new PairChannel(stream, 'primary', (m, ch) => {
              received.push(m);
              script(m, ch);
            }, rest);
          },
        },
      ],
    ]),
  });
  const socket = join(dir, 's.sock');
  const listener = await (await defaultTransports()).get('unix').listen(socket, { onConnection: (c) => server.attach(c) });
  return {
    uri: unixUri(socket),
    socket,
    received,
    disk,
    close: async () => {
      await listener.close();
      await server.shutdown();
    },
  };
}

/** a secondary's NodeSummary for welcomes (fields over it as given) */
export function secondarySummary(o: Partial<NodeSummary> = {}): NodeSummary {
  return { nodeId: 'scripted', role: 'secondary', gi: freshTuple(), epoch: 0, diskState: 'UpToDate', crashedPrimary: false, bitmapBytes: 0, ...o };
}

/** the welcome to `hello` (no dataToken: the primary writes the export ''); a full resync unless `decision` says otherwise */
export function welcome(hello: Extract<PairMessage, { type: 'hello' }>, size: number, summary: NodeSummary, decision: LinkDecision = { rule: 20, action: 'resync-full', explanation: 'scripted' }): PairMessage {
  return { type: 'welcome', re: hello.seq, version: PAIR_LINK_VERSION, size, ordered: true, ...summary, decision };
}
