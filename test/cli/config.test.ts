/**
 * blkrep config check FILE and serve-nbd --config FILE, run as an operator would: a valid file
 * serves what it says (checked with nbdinfo), flags on the command line win, a bad file is
 * refused before anything listens (exit 2, ERR_CONFIG, file:line:column and the key).
 */
import { readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { hasTool, makeTempDir, run, runCli, serve, start, waitFor } from '../support/spawn.js';

describe('blkrep config check', () => {
  it('a valid file: exit 0, the equivalent command line', async () => {
    const dir = await makeTempDir();
    const file = join(dir, 'pair0.yaml');
    await writeFile(file, 'image: /dev/vdb\nsecondary: true\nbind: 0.0.0.0\nport: 10809\nheartbeat:\n  - udp://10.0.0.1:7000\npeer-id: nodeA\ndescription: "it\'s a disk"\n');
    const r = await runCli(['config', 'check', file, '--json']);
    expect(r.code, r.stderr).toBe(0);
    expect(JSON.parse(r.stdout)).toEqual({
      file,
      valid: true,
      values: { image: '/dev/vdb', secondary: true, bind: '0.0.0.0', port: '10809', heartbeat: ['udp://10.0.0.1:7000'], 'peer-id': 'nodeA', description: "it's a disk" },
      argv: ['/dev/vdb', '--secondary', '--bind=0.0.0.0', '--port=10809', '--heartbeat=udp://10.0.0.1:7000', '--peer-id=nodeA', "--description=it's a disk"],
    });
    const text = await runCli(['config', 'check', file]);
    expect(text.code).toBe(0);
    expect(text.stdout).toBe(`${file}: valid\n  = blkrep serve-nbd /dev/vdb --secondary --bind=0.0.0.0 --port=10809 --heartbeat=udp://10.0.0.1:7000 --peer-id=nodeA '--description=it'\\''s a disk'\n`);
  });

  it('a bad file: exit 2, ERR_CONFIG, every problem with its line (JSON: issues)', async () => {
    const dir = await makeTempDir();
    const file = join(dir, 'bad.yaml');
    await writeFile(file, 'image: a.img\nport: 70000\nprotcol: sync\n');
    const r = await runCli(['config', 'check', file, '--json']);
    expect(r.code).toBe(2);
    const out = JSON.parse(r.stdout) as { error: { code: string; message: string; issues: unknown[] } };
    expect(out.error.code).toBe('ERR_CONFIG');
    expect(out.error.issues).toEqual([
      { key: 'port', line: 2, column: 7, message: 'expected an integer less than or equal to 65535 but received: 70000' },
      { key: 'protcol', line: 3, column: 1, message: 'is not a flag of serve-nbd (did you mean "protocol"?)' },
    ]);
    const text = await runCli(['config', 'check', file]);
    expect(text.code).toBe(2);
    expect(text.stdout).toBe('');
    expect(text.stderr).toBe(`blkrep: ${file}: 2 problems\n${file}:2:7: key "port": expected an integer less than or equal to 65535 but received: 70000\n${file}:3:1: key "protcol": is not a flag of serve-nbd (did you mean "protocol"?)\n`);
  });

  it('no such file: exit 2, ERR_CONFIG', async () => {
    const r = await runCli(['config', 'check', '/nonexistent/blkrep.yaml', '--json']);
    expect(r.code).toBe(2);
    expect(JSON.parse(r.stdout)).toEqual({ error: { code: 'ERR_CONFIG', message: '/nonexistent/blkrep.yaml: cannot read the config file: no such file', issues: [{ key: '', message: 'cannot read the config file: no such file' }] } });
  });
});

describe('serve-nbd --config', () => {
  it.runIf(hasTool('nbdinfo'))('serves what the file says; a flag on the command line wins over the file', async () => {
    const dir = await makeTempDir();
    const file = join(dir, 'd.yaml');
    const sock = join(dir, 'nbd.sock');
    await writeFile(file, `image: memory:4M\nname: fromfile\nsocket: ${sock}\nread-only: true\ndescription: from the file\n`);
    const s = await serve(['--config', file, '--name', 'fromargv', 'memory:8M']);
    expect(s.uris).toEqual([`nbd+unix:///fromargv?socket=${sock}`]);
    const info = await run('nbdinfo', ['--json', s.uris[0]!]);
    expect(info.code, info.stderr).toBe(0);
    const e = (JSON.parse(info.stdout) as { exports: Array<{ 'export-name': string; 'export-size': number; 'is_read_only': boolean; description: string }> }).exports[0]!;
    expect(e['export-name']).toBe('fromargv');
    expect(e['export-size']).toBe(8 * 1024 * 1024); // the argument replaced the file's image
    expect(e.is_read_only).toBe(true); // from the file
    expect(e.description).toBe('from the file');
    expect(await s.stop()).toBe(0);
  });

  it('a bad file: exit 2 before listening, with the file, line and key', async () => {
    const dir = await makeTempDir();
    const file = join(dir, 'bad.json');
    await writeFile(file, JSON.stringify({ image: 'memory:4M', port: 0, socket: join(dir, 's') }, null, 2).replace('"port": 0', '"port": "zero"'));
    const r = await runCli(['serve-nbd', '--config', file, '--json']);
    expect(r.code).toBe(2);
    expect(JSON.parse(r.stdout)).toEqual({ error: { code: 'ERR_CONFIG', message: `${file}:3:11: key "port": expected an integer but received: zero` } });
  });

  it('a relation the file and the command line break together: refused at the file\'s line (exit 2)', async () => {
    const dir = await makeTempDir();
    const file = join(dir, 'sec.yaml');
    await writeFile(file, 'image: memory:4M\nsecondary: true\n');
    const r = await runCli(['serve-nbd', '--config', file, '--read-only', '--json']);
    expect(r.code).toBe(2);
    expect(JSON.parse(r.stdout)).toEqual({ error: { code: 'ERR_CONFIG', message: `${file}:2:1: key "secondary": cannot be used with "read-only" (as --secondary cannot with --read-only)` } });
  });
});

describe.runIf(hasTool('python3') && hasTool('systemd-notify'))('serve-nbd under systemd (Type=notify)', () => {
  it('sends READY=1 with its pid to $NOTIFY_SOCKET once it listens', async () => {
    const dir = await makeTempDir();
    const notify = join(dir, 'notify.sock');
    const got = join(dir, 'got');
    // a datagram socket as systemd's: print the first message into a file
    const receiver = start('python3', ['-c', `import socket,sys\ns=socket.socket(socket.AF_UNIX,socket.SOCK_DGRAM)\ns.bind(sys.argv[1])\nprint('bound',flush=True)\nopen(sys.argv[2],'wb').write(s.recv(4096))`, notify, got]);
    await waitFor(() => (receiver.stdout().includes('bound') ? true : undefined), 'the notify socket', { timeoutMs: 20_000, intervalMs: 50 });
    const s = await serve(['memory:1M', '--socket', join(dir, 'nbd.sock')], { env: { ...process.env, NOTIFY_SOCKET: notify } });
    await receiver.waitExit(20_000);
    const message = (await readFile(got, 'utf8')).split('\n').filter(Boolean).sort();
    expect(message).toEqual([`MAINPID=${s.pid}`, 'READY=1']);
    expect(await s.stop()).toBe(0);
  });
});
