/**
 * The operator's pass over the pair commands (session 11, task op): what a script or a person
 * running the commands by hand met, one test each.
 */
import { spawnSync } from 'node:child_process';
import { existsSync, readdirSync, readFileSync } from 'node:fs';
import { mkdir, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { EVENT_NAMES } from '../../src/cli/event-names.js';
import { absoluteImageSpec, absolutePathsUri } from '../../src/cli/socket-uri.js';
import { EVENT_SCHEMAS, OUTPUT_SCHEMAS } from '../../src/cli/output-schemas.js';
import { BIN, REPO_ROOT, hasTool, makeTempDir, run, runCli, serve, unixUri, waitFor } from '../support/spawn.js';

const MiB = 1 << 20;
const json = <T = Record<string, unknown>>(stdout: string): T => JSON.parse(stdout) as T;

describe('blkrep events: --event and --until names', () => {
  it('EVENT_NAMES is the list of EVENT_SCHEMAS (every name the daemon publishes)', () => {
    expect([...EVENT_NAMES].sort()).toEqual(Object.keys(EVENT_SCHEMAS).sort());
  });

  it('a name no event has is a usage error at once (exit 2, ERR_USAGE, the names listed), not a wait until --timeout', async () => {
    const dir = await makeTempDir();
    const ctl = join(dir, 'none.ctl');
    for (const args of [['--until', 'ready'], ['--event', 'job-ready', '--event', 'job-eror']]) {
      const r = await runCli(['events', '--control', ctl, '--timeout', '600', '--json', ...args]);
      expect(r.code).toBe(2);
      const err = JSON.parse(r.stdout) as { error: { code: string; message: string } };
      expect(err.error.code).toBe('ERR_USAGE');
      expect(err.error.message).toContain(args.at(-1) === 'ready' ? '--until "ready": no event has this name (did you mean job-ready?)' : '--event "job-eror": no event has this name');
      expect(err.error.message).toContain('the names: auto-failover, bitmap-added');
    }
    const text = await runCli(['events', '--control', ctl, '--until', 'checkpoint-done']);
    expect(text.code).toBe(2);
    expect(text.stderr).toContain('--until "checkpoint-done": no event has this name');
    // a known name goes on to the control socket (here: nobody there, exit 1)
    const known = await runCli(['events', '--control', ctl, '--until', 'checkpoint', '--json']);
    expect(known.code).toBe(1);
    expect((JSON.parse(known.stdout) as { error: { code: string } }).error.code).toBe('ERR_CONTROL_UNREACHABLE');
  });
});

describe('checkpoint on the secondary of a blkrep primary', () => {
  it('is refused (ERR_PAIR_ROLE, exit 1): it used to take epoch n+1 there, so the primary\'s checkpoint n+1 was "committed already" and left the hidden disk full', async () => {
    const dir = await makeTempDir();
    const p = (f: string): string => join(dir, f);
    await writeFile(p('p.img'), Buffer.alloc(4 * MiB));
    await writeFile(p('s.img'), Buffer.alloc(4 * MiB));
    await serve([p('s.img'), '--secondary', '--socket', p('s.sock'), '--control', p('sctl')]);
    await serve([p('p.img'), '--socket', p('p.sock'), '--control', p('pctl'), '--replicate-to', unixUri(p('s.sock'))]);
    await waitFor(async () => json<{ exports: Array<{ pair?: { link: string } }> }>((await runCli(['status', '--control', p('pctl'), '--json'])).stdout).exports[0]?.pair?.link === 'connected', 'the pair link');
    const first = await runCli(['checkpoint', '--control', p('pctl'), '--json']);
    expect(first.code).toBe(0);
    const epoch = json<{ epoch: number }>(first.stdout).epoch;

    const onSecondary = await runCli(['checkpoint', '--control', p('sctl'), '--json']);
    expect(onSecondary.code).toBe(1);
    const err = json<{ error: { code: string; message: string } }>(onSecondary.stdout).error;
    expect(err.code).toBe('ERR_PAIR_ROLE');
    expect(err.message).toMatch(/^checkpoint: export "" is a secondary: a blkrep primary holds the pair link; checkpoints are driven from the primary/);

    // 1 MiB written, then the primary's next checkpoint empties the hidden disk: nothing to drop
    expect((await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x5a 0 1M', unixUri(p('p.sock'))])).code).toBe(0);
    const before = json<{ hiddenBytes: number }>((await runCli(['failover', '--control', p('sctl'), '--dry-run', '--json'])).stdout);
    expect(before.hiddenBytes).toBe(MiB);
    const next = await runCli(['checkpoint', '--control', p('pctl'), '--json']);
    expect(json<{ epoch: number }>(next.stdout).epoch).toBe(epoch + 1);
    const after = json<{ epoch: number; hiddenBytes: number; droppedBytes: number }>((await runCli(['failover', '--control', p('sctl'), '--dry-run', '--json'])).stdout);
    expect(after).toMatchObject({ epoch: epoch + 1, hiddenBytes: 0, droppedBytes: 0 });
  }, 120_000);
});

describe('demo --size larger than the temporary directory can hold', () => {
  it('is refused at once with the bytes needed and free (exit 2), not "the a daemon did not listen within 30 s"', async () => {
    const dir = await makeTempDir();
    const r = await runCli(['demo', '--size', '1P', '--json'], { env: { ...process.env, TMPDIR: dir } });
    expect(r.code).toBe(2);
    const err = json<{ error: { code: string; message: string } }>(r.stdout).error;
    expect(err.code).toBe('ERR_USAGE');
    const P = 2 ** 50;
    expect(err.message).toMatch(new RegExp(`^--size ${P} bytes: the demo writes both disks whole and half of one again \\(the hidden disk\\), ${2.5 * P} bytes, but ${dir} has \\d+ bytes free`));
    expect(readdirSync(dir)).toEqual([]);
  });
});

describe('replicate URI with relative paths', () => {
  it('absolutePathsUri: socket=, tls-certificates=, tls-psk-file= made absolute against the directory; the rest as it was', () => {
    expect(absolutePathsUri('nbd+unix:///?socket=../b.sock', '/srv/x')).toBe('nbd+unix:///?socket=/srv/b.sock');
    expect(absolutePathsUri('nbds+unix:///disk?socket=s%20p.sock&tls-certificates=certs&tls-verify-peer=false', '/srv')).toBe('nbds+unix:///disk?socket=/srv/s%20p.sock&tls-certificates=/srv/certs&tls-verify-peer=false');
    expect(absolutePathsUri('nbds://host:10809/disk?tls-psk-file=keys.psk&tls-username=a', '/etc/b')).toBe('nbds://host:10809/disk?tls-psk-file=/etc/b/keys.psk&tls-username=a');
    for (const same of ['nbd+unix:///?socket=/run/b.sock', 'nbd+unix:///?socket=%00abstract', 'nbd://host/disk', 'nbd://host:10809']) expect(absolutePathsUri(same, '/x')).toBe(same);
    expect(() => absolutePathsUri('garbage://x', '/x')).toThrow(/scheme "garbage" is not supported/);
  });

  it('blkrep replicate from another directory than the daemon\'s connects to the socket the path names from here', async () => {
    const dir = await makeTempDir();
    const p = (f: string): string => join(dir, f);
    await mkdir(p('sub'));
    await writeFile(p('p.img'), Buffer.alloc(4 * MiB));
    await writeFile(p('s.img'), Buffer.alloc(4 * MiB));
    await serve([p('s.img'), '--secondary', '--socket', p('s.sock'), '--control', p('sctl')]);
    await serve([p('p.img'), '--socket', p('p.sock'), '--control', p('pctl')]);
    const r = await runCli(['replicate', '--control', p('pctl'), 'nbd+unix:///?socket=../s.sock', '--json'], { cwd: p('sub') });
    expect(r.code).toBe(0);
    expect(json<{ peer: string }>(r.stdout).peer).toBe(`nbd+unix:///?socket=${p('s.sock')}`);
    await waitFor(async () => json<{ exports: Array<{ pair?: { link: string } }> }>((await runCli(['status', '--control', p('pctl'), '--json'])).stdout).exports[0]?.pair?.link === 'connected', 'the pair link');
  }, 120_000);
});

describe('live job targets with relative paths (the daemon opens them in its own directory)', () => {
  it('absoluteImageSpec: a file path (raw: too) and an NBD URI\'s file paths made absolute; memory: and absolute paths as they were', () => {
    expect(absoluteImageSpec('new.img', '/srv/x')).toBe('/srv/x/new.img');
    expect(absoluteImageSpec('../new.img', '/srv/x')).toBe('/srv/new.img');
    expect(absoluteImageSpec('raw:b/new.img', '/srv')).toBe('raw:/srv/b/new.img');
    expect(absoluteImageSpec('nbd+unix:///d?socket=t.sock', '/srv')).toBe('nbd+unix:///d?socket=/srv/t.sock');
    for (const same of ['/var/lib/new.img', 'raw:/var/new.img', 'memory:64M', 'nbd://host/disk']) expect(absoluteImageSpec(same, '/x')).toBe(same);
  });

  it('blkrep backup --control from another directory writes the TARGET the relative path names from there', async () => {
    const dir = await makeTempDir();
    const p = (f: string): string => join(dir, f);
    await mkdir(p('sub'));
    const data = Buffer.alloc(4 * MiB);
    for (let i = 0; i < data.length; i += 4096) data[i] = (i >> 12) & 0xff;
    await writeFile(p('p.img'), data);
    await writeFile(p('t.img'), Buffer.alloc(4 * MiB));
    await serve([p('p.img'), '--socket', p('p.sock'), '--control', p('pctl')]);
    const r = await runCli(['backup', '--control', p('pctl'), '../t.img', '--wait', '--json'], { cwd: p('sub') });
    expect(r.code, r.stderr).toBe(0);
    expect(readFileSync(p('t.img')).equals(data)).toBe(true);
  }, 120_000);
});

describe('serve-nbd --secondary --json', () => {
  it('its listening line (uris empty: no export until a primary connects) is valid by the serve-nbd schema', async () => {
    const dir = await makeTempDir();
    await writeFile(join(dir, 's.img'), Buffer.alloc(4 * MiB));
    const s = await serve([join(dir, 's.img'), '--secondary', '--socket', join(dir, 's.sock'), '--control', join(dir, 'sctl'), '--json']);
    const line = JSON.parse(s.listeningLine) as { event: string; uris: string[] };
    expect(line).toMatchObject({ event: 'listening', uris: [] });
    expect(OUTPUT_SCHEMAS['serve-nbd'].safeParse(line).success).toBe(true);
    expect(await s.stop()).toBe(0);
  }, 60_000);
});

describe('failover with the primary still connected, no --heartbeat (as blkrep-failover(1) says)', () => {
  it('the old primary stops forwarding (link degraded) and keeps taking its clients\' writes', async () => {
    const dir = await makeTempDir();
    const p = (f: string): string => join(dir, f);
    await writeFile(p('p.img'), Buffer.alloc(4 * MiB));
    await writeFile(p('s.img'), Buffer.alloc(4 * MiB));
    await serve([p('s.img'), '--secondary', '--socket', p('s.sock'), '--control', p('sctl')]);
    await serve([p('p.img'), '--socket', p('p.sock'), '--control', p('pctl'), '--replicate-to', unixUri(p('s.sock'))]);
    const link = async (): Promise<string | undefined> => json<{ exports: Array<{ pair?: { link: string } }> }>((await runCli(['status', '--control', p('pctl'), '--json'])).stdout).exports[0]?.pair?.link;
    await waitFor(async () => (await link()) === 'connected', 'the pair link');
    const dry = json<{ explanation: string }>((await runCli(['failover', '--control', p('sctl'), '--dry-run', '--json'])).stdout);
    expect(dry.explanation).toMatch(/; the connected primary is demoted$/);
    const fo = await runCli(['failover', '--control', p('sctl'), '--json']);
    expect(fo.code).toBe(0);
    expect(json<{ role: string }>(fo.stdout).role).toBe('primary');
    await waitFor(async () => (await link()) === 'degraded', 'the old primary degraded');
    expect((await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x33 0 64k', unixUri(p('p.sock'))])).code).toBe(0);
    const man = (await run('man', ['-l', join(REPO_ROOT, 'man', 'blkrep-failover.1')], { env: { ...process.env, MANWIDTH: '1000', MAN_KEEP_FORMATTING: '0' } })).stdout.replace(/\s+/g, ' ');
    expect(man).toContain('without --heartbeat it keeps serving its clients read-write');
  }, 120_000);
});

describe('setup: the peer address and the ids', () => {
  it('--peer or --listen that is no host name or IP address: usage error at once, nothing written', async () => {
    const dir = await makeTempDir();
    await writeFile(join(dir, 'd.img'), Buffer.alloc(MiB));
    for (const [flag, value] of [['--peer', 'bad host!'], ['--listen', '10.0.0.2:10809']] as const) {
      const args = ['setup', '--yes', '--role', 'secondary', '--disk', join(dir, 'd.img'), '--root', join(dir, 'root'), '--no-check', '--json', ...(flag === '--peer' ? [] : ['--peer', '127.0.0.1']), flag, value];
      const r = await runCli(args);
      expect(r.code).toBe(2);
      expect(json<{ error: { code: string; message: string } }>(r.stdout).error).toEqual({
        code: 'ERR_USAGE',
        message: `${flag}: "${value}" is not a host name or an IP address (letters, digits, "." and "-"; or an IPv4 or IPv6 address)`,
      });
    }
    expect(existsSync(join(dir, 'root'))).toBe(false);
    const v6 = await runCli(['setup', '--yes', '--role', 'secondary', '--disk', join(dir, 'd.img'), '--peer', 'fd00::2', '--peer-id', 'nodeA', '--root', join(dir, 'root'), '--no-check', '--json']);
    expect(v6.code).toBe(0);
  });

  const tmux = (sock: string, ...args: string[]): string => {
    const r = spawnSync('tmux', ['-S', sock, ...args], { encoding: 'utf8' });
    if (r.status !== 0) throw new Error(`tmux ${args.join(' ')}: ${r.stderr}`);
    return r.stdout;
  };

  it.runIf(hasTool('tmux'))('on a terminal, a bad peer address and a bad peer id are asked again on the spot (they failed at the end, exit 2, every answer lost)', async () => {
    const dir = await makeTempDir();
    const img = join(dir, 'd.img');
    await writeFile(img, Buffer.alloc(MiB));
    const sock = join(dir, 'tmux.sock');
    const screen = (): string => tmux(sock, 'capture-pane', '-p', '-t', 't', '-S', '-200');
    const until = (text: string): Promise<string> => waitFor(() => (screen().includes(text) ? screen() : undefined), `"${text}" on the screen`, { timeoutMs: 30_000, intervalMs: 150 });
    const type = (text: string): void => void tmux(sock, 'send-keys', '-t', 't', '-l', text);
    const key = (...keys: string[]): void => void tmux(sock, 'send-keys', '-t', 't', ...keys);
    tmux(sock, 'new-session', '-d', '-x', '160', '-y', '50', '-s', 't', `NO_COLOR=1 ${process.execPath} ${BIN} setup --root ${join(dir, 'root')} --name p3 --port 20993 --heartbeat none --tls none --no-check; echo EXIT=$?; sleep 60`);
    try {
      await until("This node's role");
      key('Down', 'Enter');
      await until('Disk to replicate');
      type(img);
      key('Enter');
      await until("Peer's address");
      type('bad host!');
      key('Enter');
      await until('"bad host!" is not a host name or an IP address');
      key('C-u');
      type('127.0.0.1');
      key('Enter');
      await until('Address to listen on');
      key('Enter');
      await until("This node's id");
      key('C-u');
      type('nodeB');
      key('Enter');
      await until("The peer's id");
      key('C-u');
      type('node A');
      key('Enter');
      await until('"node A" is not a node id');
      key('C-u');
      type('nodeA');
      key('Enter');
      await until("Size of the peer's disk");
      type('lots');
      key('Enter');
      await until('invalid size "lots"');
      key('C-u');
      key('Enter');
      const end = await until('EXIT=');
      expect(end).toContain('EXIT=0');
    } finally {
      spawnSync('tmux', ['-S', sock, 'kill-server']);
    }
    expect(readFileSync(join(dir, 'root', 'etc', 'blkrep', 'p3.yaml'), 'utf8')).toContain('the secondary of pair "p3" (peer nodeA at 127.0.0.1)');
  }, 120_000);
});

describe('README.md', () => {
  it('does not call split-brain policies and failback by bitmaps missing (both exist: --after-split-brain, src/pair/README.md)', () => {
    const readme = readFileSync(join(REPO_ROOT, 'README.md'), 'utf8');
    expect(readme).not.toMatch(/Not yet: split-brain/);
    expect(readme).not.toMatch(/failback bounded by bitmaps \(it copies the whole disk\)/);
    expect(readme).toContain('--after-split-brain');
  });
});
