/**
 * blkrep setup: --yes runs (what it writes, a second run changes nothing, the refusals), the
 * systemd unit checked by systemd-analyze verify, the secondary started from the config it wrote
 * and found by its primary over TLS, and the wizard driven in a real terminal (tmux).
 */
import { spawnSync } from 'node:child_process';
import { cp, mkdir, readdir, readFile, stat, writeFile } from 'node:fs/promises';
import { X509Certificate } from 'node:crypto';
import { existsSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { BIN, hasTool, makeTempDir, run, runCli, serve, waitFor } from '../support/spawn.js';

const MiB = 1024 * 1024;

interface SetupJson {
  changed: boolean;
  role: string;
  config: string;
  unit: string;
  files: Array<{ path: string; changed: boolean }>;
  disk: { path: string; size: number };
  warnings: string[];
  next: string[];
}

async function disk(dir: string, name: string, size: number): Promise<string> {
  const path = join(dir, name);
  await writeFile(path, '');
  spawnSync('truncate', ['-s', String(size), path]);
  return path;
}

function secondaryArgs(root: string, img: string, port: number): string[] {
  return ['setup', '--yes', '--json', '--name', 'p1', '--role', 'secondary', '--disk', img, '--peer', '127.0.0.1', '--listen', '127.0.0.1', '--port', String(port), '--node-id', 'nodeB', '--peer-id', 'nodeA', '--heartbeat-port', String(port + 1), '--root', root];
}

describe('blkrep setup --yes', () => {
  it('writes the config, the keys (0600) and the unit; a second run with the same answers changes nothing', async () => {
    const dir = await makeTempDir();
    const img = await disk(dir, 'b.img', 64 * MiB);
    const root = join(dir, 'root');
    const first = await runCli(secondaryArgs(root, img, 20950));
    expect(first.code, first.stderr).toBe(0);
    const out = JSON.parse(first.stdout) as SetupJson;
    expect(out.changed).toBe(true);
    expect(out.config).toBe(join(root, 'etc/blkrep/p1.yaml'));
    expect(out.unit).toBe(join(root, 'etc/systemd/system/blkrep@.service'));
    expect(out.disk).toEqual({ path: img, size: 64 * MiB });
    expect(out.files.map((f) => [f.path.slice(root.length), f.changed])).toEqual([
      ['/etc/blkrep/p1/heartbeat.key', true],
      ['/etc/blkrep/p1/tls', true],
      ['/etc/blkrep/p1.yaml', true],
      ['/etc/systemd/system/blkrep@.service', true],
    ]);
    for (const f of ['p1/heartbeat.key', 'p1/tls/server-key.pem', 'p1/tls/client-key.pem', 'p1/peer-tls/server-key.pem', 'p1/ca/ca-key.pem']) {
      expect(((await stat(join(root, 'etc/blkrep', f))).mode & 0o777).toString(8), f).toBe('600');
    }
    const yaml = await readFile(out.config, 'utf8');
    expect(yaml).toContain(`image: ${img}\nname: p1\ncontrol: p1\nsecondary: true\nbind: 127.0.0.1\nport: 20950\ntls-certificates: ${join(root, 'etc/blkrep/p1/tls')}\ntls-authz:\n  - O=blkrep,CN=nodeA\n`);
    // the file it wrote is valid for serve-nbd
    const check = await runCli(['config', 'check', out.config, '--json']);
    expect(check.code, check.stdout).toBe(0);
    // the next commands: copy the keys to the peer, set it up as primary with this disk's size, start here
    expect(out.next).toContain(`scp -p ${join(root, 'etc/blkrep/p1/heartbeat.key')} 127.0.0.1:${join(root, 'etc/blkrep/p1/heartbeat.key')}`);
    expect(out.next.find((c) => c.includes('setup'))).toMatch(/--role primary .*--node-id nodeA --peer-id nodeB --peer-disk-size 67108864/);
    expect(out.next.slice(-2)).toEqual(['systemctl enable --now blkrep@p1', expect.stringMatching(/ status --control p1$/)]);

    const before = await Promise.all(out.files.map(async (f) => (await stat(join(f.path, f.path.endsWith('tls') ? 'server-cert.pem' : ''))).mtimeMs));
    const again = await runCli(secondaryArgs(root, img, 20950));
    expect(again.code, again.stderr).toBe(0);
    const second = JSON.parse(again.stdout) as SetupJson;
    expect(second.changed).toBe(false);
    expect(second.files.every((f) => !f.changed)).toBe(true);
    expect(await readFile(out.config, 'utf8')).toBe(yaml);
    const after = await Promise.all(out.files.map(async (f) => (await stat(join(f.path, f.path.endsWith('tls') ? 'server-cert.pem' : ''))).mtimeMs));
    expect(after).toEqual(before);
  });

  it('refuses disks of different sizes (ERR_SETUP_SIZE, exit 1) and writes nothing', async () => {
    const dir = await makeTempDir();
    const img = await disk(dir, 'a.img', 32 * MiB);
    const root = join(dir, 'root');
    const r = await runCli(['setup', '--yes', '--json', '--role', 'primary', '--disk', img, '--peer', '127.0.0.1', '--port', '20960', '--peer-disk-size', '67108864', '--root', root, '--no-check']);
    expect(r.code).toBe(1);
    expect(JSON.parse(r.stdout)).toEqual({ error: { code: 'ERR_SETUP_SIZE', message: `the disks differ: ${img} is 33554432 bytes (32 MiB), the peer's is 67108864 bytes (64 MiB); a pair needs two disks of the same size` } });
    expect(existsSync(root)).toBe(false);
  });

  it('refuses a disk that is not there (ERR_SETUP_DISK, exit 1)', async () => {
    const dir = await makeTempDir();
    const r = await runCli(['setup', '--yes', '--json', '--role', 'secondary', '--disk', join(dir, 'none.img'), '--peer', 'x', '--root', dir]);
    expect(r.code).toBe(1);
    expect(JSON.parse(r.stdout)).toEqual({ error: { code: 'ERR_SETUP_DISK', message: `the disk ${join(dir, 'none.img')} does not exist` } });
  });

  it('without a terminal and without --yes: a usage error (exit 2) that says what to give; --yes without a role: the flag it needs', async () => {
    const r = await runCli(['setup', '--json']);
    expect(r.code).toBe(2);
    expect(JSON.parse(r.stdout)).toEqual({ error: { code: 'ERR_USAGE', message: 'not a terminal, so nothing can be asked: give --yes and the answers as flags (--role, --disk, --peer …; blkrep setup --help)' } });
    const y = await runCli(['setup', '--yes', '--json']);
    expect(y.code).toBe(2);
    expect(JSON.parse(y.stdout)).toEqual({ error: { code: 'ERR_USAGE', message: '--yes: --role is needed (there is no default)' } });
    const bad = await runCli(['setup', '--yes', '--json', '--role', 'secondary', '--disk', BIN, '--peer', 'x', '--protocol', 'async']);
    expect(bad.code).toBe(2);
    expect(JSON.parse(bad.stdout).error.message).toBe("--checkpoint-interval and --protocol are the primary's (the secondary takes what its primary says)");
  });

  it('--tls x509 with a node id that cannot be a certificate\'s host name: a usage error before anything is written', async () => {
    const dir = await makeTempDir();
    const img = await disk(dir, 'b.img', MiB);
    const root = join(dir, 'root');
    const r = await runCli(['setup', '--yes', '--json', '--role', 'secondary', '--disk', img, '--peer', '127.0.0.1', '--node-id', 'node_b', '--peer-id', 'nodeA', '--tls', 'x509', '--root', root, '--no-check']);
    expect(r.code).toBe(2);
    expect(JSON.parse(r.stdout)).toEqual({ error: { code: 'ERR_USAGE', message: '--node-id "node_b": with --tls x509 a node id is also the name in its certificate, so it must be a host name (letters, digits, "." and "-", not starting or ending with "." or "-")' } });
    expect(existsSync(root)).toBe(false);
  });

  it('the x509 credentials come from generatePairCredentials: one CA, CN and subjectAltName = the node id, the primary names the peer as tls-hostname', async () => {
    const dir = await makeTempDir();
    const img = await disk(dir, 'b.img', MiB);
    const root = join(dir, 'root');
    const r = await runCli([...secondaryArgs(root, img, 20955), '--heartbeat', 'none', '--no-check']);
    expect(r.code, r.stderr).toBe(0);
    const etc = join(root, 'etc/blkrep/p1');
    const own = new X509Certificate(await readFile(join(etc, 'tls/server-cert.pem')));
    const peer = new X509Certificate(await readFile(join(etc, 'peer-tls/client-cert.pem')));
    const ca = new X509Certificate(await readFile(join(etc, 'ca/ca-cert.pem')));
    expect(own.subject).toBe('O=blkrep\nCN=nodeB');
    expect(own.subjectAltName).toBe('DNS:nodeB');
    expect(peer.subject).toBe('O=blkrep\nCN=nodeA');
    expect(own.verify(ca.publicKey) && peer.verify(ca.publicKey)).toBe(true);
    expect(await readFile(join(etc, 'tls/ca-cert.pem'), 'utf8')).toBe(await readFile(join(etc, 'ca/ca-cert.pem'), 'utf8'));
    // no scratch directory left behind
    expect((await readdir(etc)).sort()).toEqual(['ca', 'peer-tls', 'tls']);
    const pri = await runCli(['setup', '--yes', '--json', '--name', 'p1', '--role', 'primary', '--disk', img, '--peer', '10.0.0.2', '--node-id', 'nodeA', '--peer-id', 'nodeB', '--heartbeat', 'none', '--root', join(dir, 'rootA'), '--no-check']);
    expect(pri.code, pri.stderr).toBe(0);
    expect(await readFile(join(dir, 'rootA/etc/blkrep/p1.yaml'), 'utf8')).toContain(`replicate-to: nbds://10.0.0.2:10809/p1?tls-certificates=${join(dir, 'rootA/etc/blkrep/p1/tls')}&tls-hostname=nodeB\n`);
  });

  it('checks that the clock is synchronised (timedatectl, else chronyc): a warning when not, null when nothing says', async () => {
    const dir = await makeTempDir();
    const img = await disk(dir, 'b.img', MiB);
    const bin = join(dir, 'bin');
    await mkdir(bin);
    const fake = async (name: string, script: string): Promise<void> => {
      await writeFile(join(bin, name), `#!/bin/sh\n${script}\n`, { mode: 0o755 });
    };
    const setup = async (n: number): Promise<SetupJson & { clock: { synchronized: boolean | null; source: string } }> => {
      const r = await runCli([...secondaryArgs(join(dir, `root${n}`), img, 20940 + n * 2), '--tls', 'none', '--heartbeat', 'none'], { env: { ...process.env, PATH: `${bin}:/usr/bin:/bin` } });
      expect(r.code, r.stderr).toBe(0);
      return JSON.parse(r.stdout);
    };
    await fake('timedatectl', 'echo no');
    const no = await setup(1);
    expect(no.clock).toEqual({ synchronized: false, source: 'timedatectl: NTPSynchronized=no' });
    expect(no.warnings).toEqual([expect.stringMatching(/^this node's clock is not synchronised \(timedatectl: NTPSynchronized=no\); .*enable NTP on both/)]);
    await fake('timedatectl', 'echo yes');
    const yes = await setup(2);
    expect(yes.clock).toEqual({ synchronized: true, source: 'timedatectl: NTPSynchronized=yes' });
    expect(yes.warnings).toEqual([]);
    // no systemd (a container): chronyc says
    await fake('timedatectl', 'echo "System has not been booted with systemd" >&2; exit 1');
    await fake('chronyc', 'printf "Reference ID    : 00000000 ()\\nLeap status     : Not synchronised\\n"');
    const chrony = await setup(3);
    expect(chrony.clock).toEqual({ synchronized: false, source: 'chronyc tracking: leap status Not synchronised' });
    expect(chrony.warnings).toHaveLength(1);
    await fake('chronyc', 'echo "506 Cannot talk to daemon" >&2; exit 1');
    const none = await setup(4);
    expect(none.clock).toEqual({ synchronized: null, source: 'cannot tell: neither timedatectl nor chronyc answered' });
    expect(none.warnings).toEqual([]);
  });

  it.runIf(hasTool('systemd-analyze'))('the unit passes systemd-analyze verify (and the check sees a broken key)', async () => {
    const dir = await makeTempDir();
    const img = await disk(dir, 'b.img', MiB);
    const root = join(dir, 'root');
    expect((await runCli([...secondaryArgs(root, img, 20970), '--tls', 'none', '--heartbeat', 'none'])).code).toBe(0);
    const unit = await readFile(join(root, 'etc/systemd/system/blkrep@.service'), 'utf8');
    for (const key of ['Type=notify', 'NotifyAccess=all', 'ExecReload=/bin/kill -HUP $MAINPID', 'NoNewPrivileges=yes', 'ProtectSystem=full', `ExecStart=${process.execPath} ${BIN} serve-nbd --config ${join(root, 'etc/blkrep')}/%i.yaml`]) {
      expect(unit).toContain(`\n${key}\n`);
    }
    const instance = join(dir, 'blkrep@p1.service');
    await writeFile(instance, unit);
    const ok = await run('systemd-analyze', ['verify', '--man=no', instance], { timeoutMs: 60_000 });
    expect(ok.stderr).toBe('');
    expect(ok.code).toBe(0);
    await writeFile(instance, unit.replace('ProtectClock=yes', 'ProtectClok=yes'));
    const broken = await run('systemd-analyze', ['verify', '--man=no', instance], { timeoutMs: 60_000 });
    expect(broken.stderr).toContain("Unknown key 'ProtectClok' in section [Service]");
  });

  it.runIf(hasTool('qemu-io'))('the secondary serves from the config it wrote; its primary, set up with the copied keys, replicates to it', async () => {
    const dir = await makeTempDir();
    const b = await disk(dir, 'b.img', 16 * MiB);
    const a = await disk(dir, 'a.img', 16 * MiB);
    const rootB = join(dir, 'rootB');
    const rootA = join(dir, 'rootA');
    // the TLS pair end to end is setup-tls-pair.test.ts; here the secondary serves with the x509 it made,
    // then the answers change to no TLS and the pair runs in clear text
    const sec = await runCli([...secondaryArgs(rootB, b, 20980), '--heartbeat', 'none']);
    expect(sec.code, sec.stderr).toBe(0);
    // what the next commands say to copy, copied
    await cp(join(rootB, 'etc/blkrep/p1/peer-tls'), join(rootA, 'etc/blkrep/p1/tls'), { recursive: true });
    const pri = await runCli(['setup', '--yes', '--json', '--name', 'p1', '--role', 'primary', '--disk', a, '--peer', '127.0.0.1', '--port', '20980', '--node-id', 'nodeA', '--peer-id', 'nodeB', '--heartbeat', 'none', '--tls', 'none', '--peer-disk-size', String(16 * MiB), '--root', rootA, '--no-check']);
    expect(pri.code, pri.stderr).toBe(0);
    const priOut = JSON.parse(pri.stdout) as SetupJson;
    expect(priOut.files.map((f) => f.path.slice(rootA.length))).toEqual(['/etc/blkrep/p1.yaml', '/etc/systemd/system/blkrep@.service']);
    const tlsSecondary = await serve(['--config', join(rootB, 'etc/blkrep/p1.yaml'), '--control', join(dir, 'b0.ctl')]);
    expect(JSON.parse(tlsSecondary.listeningLine).tls, tlsSecondary.listeningLine).toMatchObject({ mode: 'require', kind: 'x509+verify-peer' });
    expect(await tlsSecondary.stop()).toBe(0);
    // other answers (no TLS): the config is rewritten
    const plain = await runCli([...secondaryArgs(rootB, b, 20980), '--heartbeat', 'none', '--tls', 'none']);
    expect(plain.code, plain.stderr).toBe(0);
    expect((JSON.parse(plain.stdout) as SetupJson).files.filter((f) => f.changed).map((f) => f.path.slice(rootB.length))).toEqual(['/etc/blkrep/p1.yaml']);
    const secondary = await serve(['--config', join(rootB, 'etc/blkrep/p1.yaml'), '--control', join(dir, 'b.ctl')]);
    const sockA = join(dir, 'a.sock');
    const primary = await serve(['--config', join(rootA, 'etc/blkrep/p1.yaml'), '--control', join(dir, 'a.ctl'), '--socket', sockA]);
    await waitFor(async () => {
      const s = await runCli(['status', '--control', join(dir, 'a.ctl'), '--json']);
      return /"link":\s*"connected"/.test(s.stdout) ? true : undefined;
    }, 'the pair link to come up', { timeoutMs: 60_000, intervalMs: 500 });
    // protocol sync: a write has reached the secondary's disk when it completes
    const w = await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x5a 1M 1M', `nbd+unix:///p1?socket=${sockA}`]);
    expect(w.code, w.stderr).toBe(0);
    const bytes = await readFile(b);
    expect(bytes.subarray(MiB, 2 * MiB).every((x) => x === 0x5a)).toBe(true);
    expect(bytes.subarray(0, MiB).every((x) => x === 0)).toBe(true);
    expect(await primary.stop()).toBe(0);
    expect(await secondary.stop()).toBe(0);
  });
});

function tmux(socket: string, ...args: string[]): string {
  const r = spawnSync('tmux', ['-S', socket, ...args], { encoding: 'utf8' });
  if (r.status !== 0) throw new Error(`tmux ${args.join(' ')}: ${r.stderr}`);
  return r.stdout;
}

describe.runIf(hasTool('tmux'))('blkrep setup on a terminal (tmux)', () => {
  async function screenWith(sock: string, text: string | RegExp, what: string): Promise<string> {
    return waitFor(() => {
      const s = tmux(sock, 'capture-pane', '-p', '-t', 't', '-S', '-200');
      return (typeof text === 'string' ? s.includes(text) : text.test(s)) ? s : undefined;
    }, what, { timeoutMs: 30_000, intervalMs: 150 });
  }

  async function answer(sock: string, question: string, ...keys: string[]): Promise<void> {
    await screenWith(sock, question, `the question "${question}"`);
    if (keys.length) tmux(sock, 'send-keys', '-t', 't', ...keys);
  }

  it('asks every question of a whole secondary setup, then a primary refused for its disk size', async () => {
    const dir = await makeTempDir();
    const b = await disk(dir, 'b.img', 8 * MiB);
    const a = await disk(dir, 'a.img', 4 * MiB);
    const root = join(dir, 'root');
    const sock = join(dir, 'tmux.sock');
    const env = `NO_COLOR=1`;
    tmux(sock, 'new-session', '-d', '-x', '160', '-y', '50', '-s', 't', `${env} ${process.execPath} ${BIN} setup --root ${root} --name p2 --port 20990 --heartbeat-port 20991; echo EXIT=$?; sleep 60`);
    try {
      await answer(sock, "This node's role", 'Down', 'Enter');
      await answer(sock, 'Disk to replicate', '-l', join(dir, 'nope.img'));
      tmux(sock, 'send-keys', '-t', 't', 'Enter');
      await screenWith(sock, 'does not exist', 'the disk refused on the spot');
      tmux(sock, 'send-keys', '-t', 't', 'C-u');
      tmux(sock, 'send-keys', '-t', 't', '-l', b);
      tmux(sock, 'send-keys', '-t', 't', 'Enter');
      await answer(sock, "Peer's address", '-l', '127.0.0.1');
      tmux(sock, 'send-keys', '-t', 't', 'Enter');
      await answer(sock, 'Address to listen on', '-l', '127.0.0.1');
      tmux(sock, 'send-keys', '-t', 't', 'Enter');
      await answer(sock, 'TLS on the pair link', 'Down', 'Enter'); // psk
      await answer(sock, 'Heartbeat (how', 'Enter'); // udp
      await answer(sock, "This node's id", '-l', 'nodeB');
      tmux(sock, 'send-keys', '-t', 't', 'Enter');
      await answer(sock, "The peer's id", '-l', 'nodeA');
      tmux(sock, 'send-keys', '-t', 't', 'Enter');
      await answer(sock, "Size of the peer's disk", 'Enter');
      const screen = await screenWith(sock, 'EXIT=', 'setup to finish');
      expect(screen).toContain('EXIT=0');
      expect(screen).toContain(`wrote   ${join(root, 'etc/blkrep/p2.yaml')}`);
      expect(screen).toContain('systemctl enable --now blkrep@p2');
    } finally {
      spawnSync('tmux', ['-S', sock, 'kill-server']);
    }
    const yaml = await readFile(join(root, 'etc/blkrep/p2.yaml'), 'utf8');
    expect(yaml).toContain(`image: ${b}\nname: p2\ncontrol: p2\nsecondary: true\nbind: 127.0.0.1\nport: 20990\ntls-psk: ${join(root, 'etc/blkrep/p2/keys.psk')}\nheartbeat:\n  - udp://127.0.0.1:20991?listen=127.0.0.1:20991\nnode-id: nodeB\npeer-id: nodeA\n`);
    expect(await readFile(join(root, 'etc/blkrep/p2/keys.psk'), 'utf8')).toMatch(/^blkrep-p2:[0-9a-f]{64}\n$/);

    // the primary, whose disk is half the size: refused, nothing written
    const rootA = join(dir, 'rootA');
    tmux(sock, 'new-session', '-d', '-x', '160', '-y', '50', '-s', 't', `${env} ${process.execPath} ${BIN} setup --root ${rootA} --name p2 --peer 127.0.0.1 --port 20990 --tls psk --heartbeat none --node-id nodeA --peer-id nodeB --no-check; echo EXIT=$?; sleep 60`);
    try {
      await answer(sock, "This node's role", 'Enter'); // primary
      await answer(sock, 'Disk to replicate', '-l', a);
      tmux(sock, 'send-keys', '-t', 't', 'Enter');
      await answer(sock, 'Checkpoint interval', 'Enter');
      await answer(sock, 'Protocol', 'Enter');
      await answer(sock, "Size of the peer's disk", '-l', '8M');
      tmux(sock, 'send-keys', '-t', 't', 'Enter');
      const screen = await screenWith(sock, 'EXIT=', 'setup to finish');
      expect(screen).toContain('EXIT=1');
      expect(screen.replace(/\n/g, '')).toContain(`the disks differ: ${a} is 4194304 bytes (4 MiB), the peer's is 8388608 bytes (8 MiB)`);
    } finally {
      spawnSync('tmux', ['-S', sock, 'kill-server']);
    }
    expect(existsSync(rootA)).toBe(false);
  });
});
