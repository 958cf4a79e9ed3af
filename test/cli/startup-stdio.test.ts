/**
 * The short commands' output without node's process.stdout/process.stderr streams (bin/run.js's
 * blkrep.stdio, scripts/bundle-oclif.mjs's patches of oclif): fs.writeSync to the descriptor, and
 * the stream only after a write fails (EAGAIN, EPIPE …). Seen from outside: the modules node
 * loads, the bytes on stdout and stderr against BLKREP_OCLIF_BUNDLE=0 (oclif from node_modules,
 * console.log), exit codes with a reader that went away, and a big output through a non-blocking
 * pipe whose reader is slow (python3 makes the pipe: node's own are sockets, blocking on the
 * child's side).
 */
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { beforeAll, describe, expect, it } from 'vitest';
import { BIN, hasTool, makeTempDir, run, runCli } from '../support/spawn.js';

// as an operator runs it: vitest's NODE_ENV=test makes oclif look for TypeScript sources (and
// load crypto and the streams for it); NODE_EXTRA_CA_CERTS is parsed at every start
const env = (extra: NodeJS.ProcessEnv = {}): NodeJS.ProcessEnv => {
  const e: NodeJS.ProcessEnv = { ...process.env, ...extra };
  delete e.NODE_ENV;
  delete e.NODE_EXTRA_CA_CERTS;
  return e;
};
const unbundled = env({ BLKREP_OCLIF_BUNDLE: '0' });

let dir: string;
let img: string; // 64 MiB qcow2 with an empty bitmap b0
let big: string; // 1 GiB qcow2 whose bitmap b0 has every other 64 KiB granule dirty: 16384 runs

beforeAll(async () => {
  dir = await makeTempDir('file');
  img = join(dir, 'disk.qcow2');
  big = join(dir, 'big.qcow2');
  for (const [file, size] of [[img, '64M'], [big, '1G']] as const) {
    expect((await run('qemu-img', ['create', '-q', '-f', 'qcow2', file, size])).code).toBe(0);
    expect((await run('qemu-img', ['bitmap', '--add', file, 'b0'])).code).toBe(0);
  }
  const map = [];
  for (let i = 0; i < 16384; i += 2) map.push({ offset: i * 65536, length: 65536, type: 'data' });
  writeFileSync(join(dir, 'map.json'), JSON.stringify(map));
  const fill = await runCli(['bitmap', 'fill', big, '--name', 'b0', '--from-json', join(dir, 'map.json')], { env: env() });
  expect(fill.code, fill.stderr).toBe(0);
}, 60_000);

describe('short commands without the stdio streams', () => {
  it('info, bitmap dump and --version load neither net, tty nor the streams', async () => {
    const list = join(dir, 'modules.txt');
    const preload = join(dir, 'modules.cjs');
    writeFileSync(preload, `process.on('exit', () => require('node:fs').writeFileSync(${JSON.stringify(list)}, process.moduleLoadList.join('\\n')));\n`);
    for (const args of [['info', img], ['info', img, '--json'], ['bitmap', 'dump', img, '-n', 'b0'], ['--version']]) {
      const r = await run(process.execPath, ['-r', preload, BIN, ...args], { env: env() });
      expect(r.code, r.stderr).toBe(0);
      expect(r.stdout.length).toBeGreaterThan(0);
      const modules = readFileSync(list, 'utf8').split('\n');
      expect(modules, args.join(' ')).toContain('NativeModule fs');
      for (const m of ['net', 'tty', 'stream', 'internal/fs/sync_write_stream']) expect(modules, `${args.join(' ')}: ${m}`).not.toContain(`NativeModule ${m}`);
    }
  });

  it('prints byte for byte what oclif prints through console.log, errors and exit codes included', async () => {
    const cases = [
      ['--version'],
      ['version', '--json'],
      ['info', img],
      ['info', img, '--json'],
      ['bitmap', 'dump', img, '-n', 'b0'],
      ['bitmap', 'dump', img, '-n', 'b0', '--json'],
      ['info', join(dir, 'missing.qcow2')],
      ['info', join(dir, 'missing.qcow2'), '--json'],
      ['info', img, '--no-such-flag'],
    ];
    for (const args of cases) {
      const bundled = await runCli(args, { env: env() });
      const plain = await runCli(args, { env: unbundled });
      expect({ code: bundled.code, stdout: bundled.stdout, stderr: bundled.stderr }, args.join(' ')).toEqual({ code: plain.code, stdout: plain.stdout, stderr: plain.stderr });
    }
  });
});

describe.runIf(hasTool('python3'))('short commands through a pipe', () => {
  // python3 -c SCRIPT CMD…: runs CMD with stdout on a pipe, prints "code=N" and CMD's stderr
  const closedFirst = 'import os,subprocess,sys\nr,w=os.pipe()\nos.close(r)\np=subprocess.Popen(sys.argv[1:],stdout=w,stderr=subprocess.PIPE)\nos.close(w)\ne=p.stderr.read()\nsys.stdout.write("code=%d\\n" % p.wait())\nsys.stdout.buffer.write(e)';
  const oneByte = 'import os,subprocess,sys\nr,w=os.pipe()\np=subprocess.Popen(sys.argv[1:],stdout=w,stderr=subprocess.PIPE)\nos.close(w)\nos.read(r,1)\nos.close(r)\ne=p.stderr.read()\nsys.stdout.write("code=%d\\n" % p.wait())\nsys.stdout.buffer.write(e)';
  // a non-blocking pipe (O_NONBLOCK on the writer's side: a write to a full pipe is EAGAIN) and a
  // reader that waits 10 ms before each of its first 40 reads of at most 64 KiB
  const slowReader = 'import os,subprocess,sys,time\nr,w=os.pipe()\nos.set_blocking(w,False)\np=subprocess.Popen(sys.argv[1:],stdout=w,stderr=subprocess.PIPE)\nos.close(w)\nout=bytearray()\nn=0\nwhile True:\n  if n<40: time.sleep(0.01)\n  n+=1\n  c=os.read(r,65536)\n  if not c: break\n  out+=c\ne=p.stderr.read()\nopen(os.environ["OUT"],"wb").write(out)\nsys.stdout.write("code=%d\\n" % p.wait())\nsys.stdout.buffer.write(e)';

  it('a reader gone before the first write, or after one byte: exit code 0, nothing on stderr', async () => {
    for (const script of [closedFirst, oneByte]) {
      for (const args of [['info', img], ['info', img, '--json'], ['--version'], ['bitmap', 'dump', big, '-n', 'b0', '--json'], ['bitmap', 'dump', big, '-n', 'b0']]) {
        const r = await run('python3', ['-c', script, process.execPath, BIN, ...args], { env: env() });
        expect(r.stdout, args.join(' ')).toBe('code=0\n');
      }
      // a failing command keeps its exit code and its message
      const failing = await run('python3', ['-c', script, process.execPath, BIN, 'info', join(dir, 'missing.qcow2')], { env: env() });
      expect(failing.stdout).toMatch(/^code=1\nblkrep: cannot open ".*missing\.qcow2": no such file\n$/);
    }
  });

  it('1.2 MB of bitmap dump --json through a slow non-blocking pipe arrives whole', async () => {
    const file = join(dir, 'dump-file.json');
    const toFile = await run('sh', ['-c', `"$@" > ${file}`, 'sh', process.execPath, BIN, 'bitmap', 'dump', big, '-n', 'b0', '--json'], { env: env() });
    expect(toFile.code, toFile.stderr).toBe(0);
    const expected = readFileSync(file);
    const entries = JSON.parse(expected.toString('utf8')) as Array<{ offset: number; length: number; description: string }>;
    expect(entries).toHaveLength(16384);
    expect(entries[16383]).toMatchObject({ offset: 16383 * 65536, length: 65536, description: 'clean' });
    const out = join(dir, 'dump-pipe.json');
    const piped = await run('python3', ['-c', slowReader, process.execPath, BIN, 'bitmap', 'dump', big, '-n', 'b0', '--json'], { env: env({ OUT: out }) });
    expect(piped.stdout).toBe('code=0\n');
    expect(readFileSync(out).equals(expected)).toBe(true);
  }, 60_000);
});
