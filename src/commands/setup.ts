import { execFile } from 'node:child_process';
import { createConnection, createServer, isIP } from 'node:net';
import { readFile, mkdir, realpath, stat, writeFile, rename, chmod } from 'node:fs/promises';
import { basename, dirname, isAbsolute, join, resolve } from 'node:path';
import os from 'node:os';
import { Flags } from '@oclif/core';
import { BlkrepError } from '../api/errors.js';
import { BlkrepCommand } from '../cli/base.js';
import { makeHeartbeatKey, makePsk, makeX509 } from '../config/credentials.js';
import { configPath, configText, nextCommands, pskUser, secretsDir, unitText, type HeartbeatKind, type Role, type SetupAnswers, type TlsKind } from '../config/setup-plan.js';
import { parseDuration } from '../cli/flags.js';
import { formatSize, parseSize } from '../util/size.js';

interface SetupResult {
  changed: boolean;
  role: Role;
  name: string;
  config: string;
  unit: string;
  files: Array<{ path: string; changed: boolean }>;
  disk: { path: string; size: number };
  /** this node's clock: synchronised by NTP (true/false), or null when no tool says (timedatectl, chronyc) */
  clock: ClockState;
  warnings: string[];
  next: string[];
}

interface ClockState {
  synchronized: boolean | null;
  /** which tool said it, or why nothing could */
  source: string;
}

const HOST_NAME_RE = /^[A-Za-z0-9](?:[A-Za-z0-9.-]{0,62}[A-Za-z0-9])?$/;
const NAME_RE = /^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$/;

/** Why ADDR is not a host name or an IP address (what --peer and --listen take), or undefined. */
export function addressProblem(addr: string): string | undefined {
  if (addr.trim() === '') return 'an address is needed';
  if (isIP(addr) !== 0 || HOST_NAME_RE.test(addr)) return undefined;
  return `"${addr}" is not a host name or an IP address (letters, digits, "." and "-"; or an IPv4 or IPv6 address)`;
}

/** Why ID is not a node id (with --tls x509 it is also a certificate's host name), or undefined. */
export function nodeIdProblem(id: string, tls: string): string | undefined {
  if (!/^[^\s\u0000-\u001f\u007f,=/]{1,64}$/.test(id)) return `"${id}" is not a node id (1 to 64 characters, no spaces, control characters, ",", "=" or "/")`;
  if (tls === 'x509' && !HOST_NAME_RE.test(id)) return `"${id}": with --tls x509 a node id is also the name in its certificate, so it must be a host name (letters, digits, "." and "-", not starting or ending with "." or "-")`;
  return undefined;
}

/** Why TEXT is not a size (the peer's disk size question), or undefined; empty is "not known". */
function sizeProblem(text: string): string | undefined {
  if (text.trim() === '') return undefined;
  try {
    parseSize(text, 'size');
    return undefined;
  } catch (err) {
    return (err as Error).message;
  }
}

function setupError(code: string, message: string, details: Record<string, unknown> = {}): BlkrepError {
  return new BlkrepError(code, message, { errno: 'EINVAL', details });
}

export default class Setup extends BlkrepCommand {
  static override summary = 'Set up this node of a replication pair: config file, keys, systemd unit.';

  static override description = `Asks for this node's role (primary or secondary), its disk, the peer's address, the transport (the secondary's address and port) and TLS (x509 certificates, a pre-shared key, or none), the heartbeat (udp, tcp or none), and on the primary the checkpoint interval and the protocol (sync or async); checks on the spot what it can: the disk exists and its size (and equals the peer's, with --peer-disk-size), the port is free, the peer answers, this node's clock is synchronised by NTP (timedatectl, else chronyc; a warning when it is not: the peer's clock cannot be read before the pair runs, so each node's setup checks its own; "clock" in --json); writes CONFIG-DIR/NAME.yaml (serve-nbd's flags; blkrep config check), the pair's keys under CONFIG-DIR/NAME/ (made on the first node, copied to the second: a file that exists is never replaced; x509 by the same code as every blkrep pair credential: a CA, and per node a server certificate for its node id, which must then be a host name, and a client certificate O=blkrep,CN=ID that the secondary's --tls-authz allows; the primary's URI names the peer's id as tls-hostname=), and the systemd template unit blkrep@.service; and prints the exact commands to run next, on the peer too.
Every question has a flag; --yes takes the defaults for the rest and never asks (Ansible, CI); without a terminal, --yes is needed (error ERR_USAGE). Running it again with the same answers changes nothing ("changed": false).
Exit status: 0 done; 1 a check refused (ERR_SETUP_DISK: no such disk; ERR_SETUP_SIZE: the peer's disk has another size; both before anything is written) or ERR_SETUP_TLS (openssl could not make the certificates: its message; the heartbeat key may be written already, a re-run keeps it); 2 usage (a flag missing with --yes, no terminal).`;

  static override examples = [
    { description: 'Ask everything on a terminal', command: '<%= config.bin %> <%= command.id %>' },
    { description: 'The secondary, without questions (as Ansible runs it)', command: '<%= config.bin %> <%= command.id %> --yes --role secondary --disk /dev/vdb --peer 10.0.0.1 --listen 10.0.0.2 --node-id nodeB --peer-id nodeA --tls x509' },
    { description: 'Its primary, checking the disks are the same size', command: '<%= config.bin %> <%= command.id %> --yes --role primary --disk /dev/vdb --peer 10.0.0.2 --node-id nodeA --peer-id nodeB --tls x509 --peer-disk-size 68719476736 --protocol sync --checkpoint-interval 20s' },
    { description: 'Try it out under a scratch root', command: '<%= config.bin %> <%= command.id %> --yes --role secondary --disk ./disk.img --peer 127.0.0.1 --root ./root --json' },
  ];

  static override flags = {
    yes: Flags.boolean({ char: 'y', description: 'ask nothing: take the defaults for what no flag gives (needed without a terminal)', default: false }),
    name: Flags.string({ description: 'the pair\'s name: the config file NAME.yaml, the unit blkrep@NAME, the control socket and the export [default: pair0]', helpValue: 'NAME' }),
    role: Flags.string({ description: 'this node\'s role', options: ['primary', 'secondary'], helpValue: 'primary|secondary' }),
    disk: Flags.string({ description: 'the disk to replicate (a block device or a raw image file)', helpValue: 'PATH' }),
    peer: Flags.string({ description: 'the peer\'s address (host name or IP)', helpValue: 'HOST' }),
    listen: Flags.string({ description: 'the secondary listens on this address (and beats go out from it) [default: 0.0.0.0]', helpValue: 'ADDR' }),
    port: Flags.integer({ description: 'the secondary\'s NBD port [default: 10809]', min: 1, max: 65535, helpValue: 'PORT' }),
    tls: Flags.string({ description: 'TLS on the pair link: x509 (a CA and a certificate per node), psk (a pre-shared key), none [default: x509]', options: ['x509', 'psk', 'none'], helpValue: 'x509|psk|none' }),
    heartbeat: Flags.string({ description: 'heartbeat backend [default: udp]', options: ['udp', 'tcp', 'none'], helpValue: 'udp|tcp|none' }),
    'heartbeat-port': Flags.integer({ description: 'heartbeat port, the same on both nodes [default: 7000]', min: 1, max: 65535, helpValue: 'PORT' }),
    'node-id': Flags.string({ description: 'this node\'s id [default: the host name]', helpValue: 'ID' }),
    'peer-id': Flags.string({ description: 'the peer\'s id [default: the peer\'s address]', helpValue: 'ID' }),
    'checkpoint-interval': Flags.string({ description: 'primary: take a checkpoint this often, e.g. 20s; "none" for only by blkrep checkpoint [default: 20s]', helpValue: 'DURATION' }),
    protocol: Flags.string({ description: 'primary: sync (a write completes on both disks) or async [default: sync]', options: ['sync', 'async'], helpValue: 'sync|async' }),
    'peer-disk-size': Flags.string({ description: 'the size of the peer\'s disk (printed by setup on the peer); refused when it differs from this disk\'s', helpValue: 'SIZE' }),
    'config-dir': Flags.string({ description: 'where NAME.yaml and the keys go [default: ROOT/etc/blkrep]', helpValue: 'DIR' }),
    root: Flags.string({ description: 'write everything under this directory instead of / (a scratch install, tests)', helpValue: 'DIR' }),
    'no-check': Flags.boolean({ description: 'do not check that the port is free and the peer answers (the disk is always checked)', default: false }),
  };

  async run(): Promise<SetupResult> {
    const { flags } = await this.parse(Setup);
    const interactive = !flags.yes;
    if (interactive && (!process.stdin.isTTY || !process.stderr.isTTY)) {
      this.usageError('not a terminal, so nothing can be asked: give --yes and the answers as flags (--role, --disk, --peer …; blkrep setup --help)');
    }
    if (interactive && this.jsonEnabled()) this.usageError('--json is for scripts: give --yes and the answers as flags');
    const ask = interactive ? await import('@inquirer/prompts') : undefined;
    const io = { output: process.stderr };
    const need = (flag: string): never => this.usageError(`--yes: --${flag} is needed (there is no default)`);

    const role = (flags.role ?? (ask ? await ask.select({ message: "This node's role", choices: [{ value: 'primary', description: 'serves the disk and replicates every write to the secondary' }, { value: 'secondary', description: 'keeps a replica; takes over with blkrep failover' }] }, io) : need('role'))) as Role;
    const disk = resolve(flags.disk ?? (ask ? await ask.input({ message: 'Disk to replicate (block device or raw image)', validate: diskAnswer }, io) : need('disk')));
    const size = await diskSize(disk);
    const peer = flags.peer ?? (ask ? await ask.input({ message: "Peer's address (host name or IP)", validate: (v) => addressProblem(v) ?? true }, io) : need('peer'));
    for (const [flag, addr] of [['peer', peer], ['listen', flags.listen]] as const) {
      const bad = addr === undefined ? undefined : addressProblem(addr);
      if (bad) this.usageError(`--${flag}: ${bad}`);
    }
    const port = flags.port ?? (ask && role === 'secondary' ? await ask.number({ message: 'NBD port this secondary listens on', default: 10809, min: 1, max: 65535, required: true }, io) : ask ? await ask.number({ message: "The secondary's NBD port", default: 10809, min: 1, max: 65535, required: true }, io) : 10809);
    const listen = flags.listen ?? (ask && role === 'secondary' ? await ask.input({ message: 'Address to listen on', default: '0.0.0.0', validate: (v) => addressProblem(v) ?? true }, io) : '0.0.0.0');
    const tls = (flags.tls ?? (ask ? await ask.select({ message: 'TLS on the pair link', choices: [{ value: 'x509', description: 'a CA and a certificate per node (made here, copied to the peer)' }, { value: 'psk', description: 'one pre-shared key (made here, copied to the peer)' }, { value: 'none', description: 'clear text: only on a private network' }], default: 'x509' }, io) : 'x509')) as TlsKind;
    const heartbeat = (flags.heartbeat ?? (ask ? await ask.select({ message: 'Heartbeat (how each node watches the other)', choices: [{ value: 'udp' }, { value: 'tcp' }, { value: 'none' }], default: 'udp' }, io) : 'udp')) as HeartbeatKind;
    const heartbeatPort = flags['heartbeat-port'] ?? (ask && heartbeat !== 'none' ? await ask.number({ message: 'Heartbeat port (the same on both nodes)', default: 7000, min: 1, max: 65535, required: true }, io) : 7000);
    const nodeId = flags['node-id'] ?? (ask ? await ask.input({ message: "This node's id", default: os.hostname(), validate: (v) => nodeIdProblem(v, tls) ?? true }, io) : os.hostname());
    const peerId = flags['peer-id'] ?? (ask ? await ask.input({ message: "The peer's id", default: peer, validate: (v) => nodeIdProblem(v, tls) ?? (v === nodeId ? `"${v}" is this node's id too: each node needs its own` : true) }, io) : peer);
    let checkpointInterval = '';
    let protocol: 'sync' | 'async' = 'sync';
    if (role === 'primary') {
      const ci = flags['checkpoint-interval'] ?? (ask ? await ask.input({ message: 'Checkpoint interval (e.g. 20s; none: only blkrep checkpoint)', default: '20s', validate: (v) => v === 'none' || okDuration(v) }, io) : '20s');
      if (ci !== 'none') {
        const ok = okDuration(ci);
        if (ok !== true) this.usageError(`--checkpoint-interval: ${ok}`);
      }
      checkpointInterval = ci === 'none' ? '' : ci;
      protocol = (flags.protocol ?? (ask ? await ask.select({ message: 'Protocol', choices: [{ value: 'sync', description: 'a write completes when both disks have it' }, { value: 'async', description: 'a write completes locally; forwarded in order' }], default: 'sync' }, io) : 'sync')) as 'sync' | 'async';
    } else if (flags['checkpoint-interval'] !== undefined || flags.protocol !== undefined) {
      this.usageError('--checkpoint-interval and --protocol are the primary\'s (the secondary takes what its primary says)');
    }
    const peerSizeText = flags['peer-disk-size'] ?? (ask ? await ask.input({ message: "Size of the peer's disk, if known (setup printed it there; empty: not known)", default: '', validate: (v) => sizeProblem(v) ?? true }, io) : undefined);

    const name = flags.name ?? 'pair0';
    if (!NAME_RE.test(name)) this.usageError(`--name "${name}" is not a pair name (letters, digits, "_", "." and "-", at most 64, not starting with "." or "-")`);
    for (const [flag, id] of [['node-id', nodeId], ['peer-id', peerId]] as const) {
      const bad = nodeIdProblem(id, tls);
      if (bad) this.usageError(`--${flag} ${bad}`);
    }
    if (nodeId === peerId) this.usageError(`--node-id and --peer-id are both "${nodeId}": each node needs its own id`);

    // the checks: the disk, the peer's disk size, the port, the peer
    if (peerSizeText !== undefined && peerSizeText.trim() !== '') {
      const peerSize = parseSize(peerSizeText, '--peer-disk-size');
      if (peerSize !== size) {
        throw setupError('ERR_SETUP_SIZE', `the disks differ: ${disk} is ${size} bytes (${formatSize(size)}), the peer's is ${peerSize} bytes (${formatSize(peerSize)}); a pair needs two disks of the same size`, { size, peerSize });
      }
    }
    const root = flags.root === undefined ? '/' : resolve(flags.root);
    const configDir = flags['config-dir'] === undefined ? join(root, 'etc', 'blkrep') : resolve(flags['config-dir']);
    const answers: SetupAnswers = {
      name, role, disk, peer, port, listen, tls, heartbeat, heartbeatPort, nodeId, peerId, checkpointInterval, protocol, configDir,
      unitDir: join(root, 'etc', 'systemd', 'system'),
      blkrep: await blkrepCommand(),
    };
    const warnings: string[] = [];
    const unitPath = join(answers.unitDir, 'blkrep@.service');
    const confPath = configPath(answers);
    const rerun = (await readFile(confPath, 'utf8').catch(() => '')) === configText(answers);
    const clock: ClockState = flags['no-check'] ? { synchronized: null, source: 'not checked (--no-check)' } : await clockState();
    if (!flags['no-check']) {
      if (role === 'secondary' && !rerun) {
        const busy = await portBusy(listen, port);
        if (busy) warnings.push(`port ${port} on ${listen} is in use (${busy}): the daemon cannot listen there until it is free`);
      }
      if (clock.synchronized === false) {
        warnings.push(`this node's clock is not synchronised (${clock.source}); the pair's checkpoint ages, events, logs and certificate validity compare times of two nodes: enable NTP on both (systemd-timesyncd or chrony)`);
      }
      if (role === 'primary') {
        const err = await reachable(peer, port, 2000);
        if (err) warnings.push(`the secondary ${peer}:${port} does not answer (${err}): set up and start the secondary first; the primary keeps retrying`);
      }
    }

    // write: the keys (only those missing), the config file, the unit
    const files: Array<{ path: string; changed: boolean }> = [];
    const dir = secretsDir(answers);
    await mkdir(dir, { recursive: true, mode: 0o700 });
    if (heartbeat !== 'none') files.push({ path: join(dir, 'heartbeat.key'), changed: await makeHeartbeatKey(join(dir, 'heartbeat.key')) });
    if (tls === 'psk') files.push({ path: join(dir, 'keys.psk'), changed: await makePsk(join(dir, 'keys.psk'), pskUser(answers)) });
    if (tls === 'x509') {
      const made = await makeX509(join(dir, 'ca'), { id: nodeId }, join(dir, 'tls'), { id: peerId }, join(dir, 'peer-tls'));
      files.push({ path: join(dir, 'tls'), changed: made.length > 0 });
    }
    files.push({ path: confPath, changed: await writeIfChanged(confPath, configText(answers), 0o644) });
    files.push({ path: unitPath, changed: await writeIfChanged(unitPath, unitText(answers), 0o644) });
    const changed = files.some((f) => f.changed);

    const madeHere = files.some((f) => f.changed && f.path.startsWith(dir));
    const peerCommand = madeHere ? this.peerCommand(answers, size) : undefined;
    const next = nextCommands(answers, peerCommand);
    const result: SetupResult = { changed, role, name, config: confPath, unit: unitPath, files, disk: { path: disk, size }, clock, warnings, next };
    for (const w of warnings) this.logToStderr(`blkrep setup: warning: ${w}`);
    if (!this.jsonEnabled()) {
      this.log(`${role} of pair "${name}": disk ${disk} (${size} bytes, ${formatSize(size)})`);
      for (const f of files) this.log(`  ${f.changed ? 'wrote  ' : 'kept   '} ${f.path}`);
      this.log(changed ? 'Next:' : 'Nothing changed. Next, if not done yet:');
      for (const c of next) this.log(`  ${c}`);
    }
    return result;
  }

  /** The setup command for the peer: the same pair, the other role, this disk's size to compare. */
  private peerCommand(a: SetupAnswers, size: number): string {
    const other: Role = a.role === 'primary' ? 'secondary' : 'primary';
    const words = ['blkrep', 'setup', '--yes', '--name', a.name, '--role', other, '--disk', a.disk, '--peer', a.role === 'secondary' && a.listen !== '0.0.0.0' ? a.listen : os.hostname(), '--port', String(a.port), '--tls', a.tls, '--heartbeat', a.heartbeat, '--node-id', a.peerId, '--peer-id', a.nodeId, '--peer-disk-size', String(size)];
    if (a.heartbeat !== 'none') words.push('--heartbeat-port', String(a.heartbeatPort));
    if (other === 'primary') words.push('--protocol', a.protocol, '--checkpoint-interval', '20s');
    return words.join(' ');
  }
}

async function diskAnswer(v: string): Promise<true | string> {
  try {
    await diskSize(resolve(v));
    return true;
  } catch (err) {
    return (err as Error).message;
  }
}

function okDuration(v: string): true | string {
  try {
    parseDuration(v);
    return true;
  } catch (err) {
    return (err as Error).message;
  }
}

/** The disk's size in bytes: a regular file's length, or a block device's size from sysfs. */
export async function diskSize(path: string): Promise<number> {
  let st;
  try {
    st = await stat(path);
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    throw setupError('ERR_SETUP_DISK', `the disk ${path} ${code === 'ENOENT' ? 'does not exist' : `cannot be opened (${code})`}`, { path, code });
  }
  if (st.isFile()) return st.size;
  if (st.isBlockDevice()) {
    const sys = `/sys/dev/block/${(st.rdev >> 8) & 0xfff}:${(st.rdev & 0xff) | ((st.rdev >> 12) & 0xfff00)}/size`;
    const sectors = Number((await readFile(sys, 'utf8').catch(() => '0')).trim());
    return sectors * 512;
  }
  throw setupError('ERR_SETUP_DISK', `the disk ${path} is not a block device or a regular file`, { path });
}

async function writeIfChanged(path: string, content: string, mode: number): Promise<boolean> {
  if ((await readFile(path, 'utf8').catch(() => undefined)) === content) return false;
  await mkdir(dirname(path), { recursive: true });
  const tmp = join(dirname(path), `.${basename(path)}.${process.pid}.tmp`);
  await writeFile(tmp, content, { mode });
  await chmod(tmp, mode);
  await rename(tmp, path);
  return true;
}

/** Why ADDR:PORT cannot be listened on, or undefined when it can. */
function portBusy(host: string, port: number): Promise<string | undefined> {
  return new Promise((done) => {
    const server = createServer();
    server.once('error', (err: NodeJS.ErrnoException) => done(err.code ?? err.message));
    server.listen({ host, port, exclusive: true }, () => server.close(() => done(undefined)));
  });
}

/** Why HOST:PORT does not take a TCP connection, or undefined when it does. */
function reachable(host: string, port: number, timeoutMs: number): Promise<string | undefined> {
  return new Promise((done) => {
    const socket = createConnection({ host, port });
    const timer = setTimeout(() => {
      socket.destroy();
      done(`no answer within ${timeoutMs} ms`);
    }, timeoutMs);
    socket.once('connect', () => {
      clearTimeout(timer);
      socket.destroy();
      done(undefined);
    });
    socket.once('error', (err: NodeJS.ErrnoException) => {
      clearTimeout(timer);
      done(err.code ?? err.message);
    });
  });
}

function tool(command: string, args: string[]): Promise<{ ok: boolean; out: string }> {
  return new Promise((done) => {
    execFile(command, args, { timeout: 3000, env: { ...process.env, LC_ALL: 'C' } }, (err, stdout) => done({ ok: !err, out: String(stdout) }));
  });
}

/**
 * Whether this node's clock is synchronised, as timedatectl (systemd-timesyncd, or any NTP
 * daemon systemd knows of) or else chronyc says. The peer's clock cannot be read before the pair
 * runs (NBD and the pair link carry no time), so the check is that each node keeps NTP time:
 * setup on the peer checks the peer.
 */
async function clockState(): Promise<ClockState> {
  const t = await tool('timedatectl', ['show', '-p', 'NTPSynchronized', '--value']);
  if (t.ok && /^(yes|no)$/.test(t.out.trim())) return { synchronized: t.out.trim() === 'yes', source: `timedatectl: NTPSynchronized=${t.out.trim()}` };
  const c = await tool('chronyc', ['-n', 'tracking']);
  const leap = /^Leap status\s*:\s*(.+)$/m.exec(c.out)?.[1]?.trim();
  if (c.ok && leap !== undefined) return { synchronized: leap !== 'Not synchronised', source: `chronyc tracking: leap status ${leap}` };
  return { synchronized: null, source: 'cannot tell: neither timedatectl nor chronyc answered' };
}

/** How the unit runs blkrep: this node and this bin/run.js (or the blkrep on PATH it is). */
async function blkrepCommand(): Promise<string[]> {
  const script = process.argv[1];
  if (script && isAbsolute(script)) return [process.execPath, await realpath(script)];
  return ['/usr/bin/blkrep'];
}
