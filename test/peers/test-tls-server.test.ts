/**
 * `blkrep serve-nbd --tls*` against the real TLS clients: nbdinfo (libnbd) with nbds://, qemu-img
 * and qemu-io with --object tls-creds-x509|psk and --image-opts, and our own client. x509, x509 with
 * client certificates and an allow-list, PSK; TCP and Unix. Every refusal: a clear error on the
 * client, the reason and the peer on the server's stderr, and nothing served (no byte read).
 */
import { randomBytes } from 'node:crypto';
import { copyFile, mkdir, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { beforeAll, describe, expect, it } from 'vitest';
import type { BlkrepError } from '../../src/api/errors.js';
import { ControlClient } from '../../src/control/client.js';
import { NbdClient } from '../../src/nbd/client.js';
import { hasTool, makeTempDir, run, runCli, serve, waitFor, type Served } from '../support/spawn.js';
import { CLIENT_DN, freePort, makePki, type Pki } from '../support/tls-pki.js';

const MiB = 1024 * 1024;
let pki: Pki;

beforeAll(async () => {
  pki = makePki(await makeTempDir('file'));
});

async function connect(uri: string): Promise<NbdClient> {
  return NbdClient.connect({ uri, reconnect: false, holdMs: 0 });
}

async function refusal(uri: string): Promise<BlkrepError> {
  try {
    const c = await connect(uri);
    await c.close();
  } catch (err) {
    return err as BlkrepError;
  }
  throw new Error(`${uri} connected`);
}

async function roundTrip(uri: string): Promise<void> {
  const c = await connect(uri);
  try {
    const data = randomBytes(128 * 1024);
    await c.write(MiB, data);
    await c.flush();
    const back = Buffer.alloc(data.length);
    await c.read(MiB, back);
    expect(back.equals(data)).toBe(true);
  } finally {
    await c.close();
  }
}

interface Status {
  exports: Array<{ name: string; tls: string; bytesRead: number; bytesWritten: number; totalConnections: number }>;
  tls: { mode: string; kind?: string };
}

async function status(control: string): Promise<Status> {
  const r = await runCli(['status', '--control', control, '--json']);
  expect(r.code).toBe(0);
  return JSON.parse(r.stdout) as Status;
}

/** serve-nbd with TLS on a Unix socket and a TCP port, and a control socket. */
async function serveTls(args: string[]): Promise<{ s: Served; sock: string; port: number; control: string }> {
  const dir = await makeTempDir();
  const sock = join(dir, 's');
  const control = join(dir, 'c');
  const port = await freePort();
  const s = await serve(['memory:4M', '--socket', sock, '--port', String(port), '--control', control, ...args]);
  return { s, sock, port, control };
}

const nbdinfo = hasTool('nbdinfo');
const qemu = hasTool('qemu-img') && hasTool('qemu-io');

describe('serve-nbd --tls-certificates (x509)', () => {
  it('nbds:// URIs in the listening line; our client, nbdinfo and qemu-img/qemu-io over TCP and Unix; status says require', async () => {
    const { s, sock, port, control } = await serveTls(['--tls-certificates', pki.server]);
    const line = JSON.parse(s.listeningLine) as { uris: string[]; tls: { mode: string; kind: string; notAfter: string; warnings: string[] } };
    expect(line.uris).toEqual([`nbds+unix:///?socket=${sock}`, `nbds://127.0.0.1:${port}/`]);
    expect(line.tls).toMatchObject({ mode: 'require', kind: 'x509' });
    // the test certificates live two days: the 30-day warning is on stderr and in the line
    expect(line.tls.warnings.join('\n')).toMatch(/server-cert\.pem expires in [01] days/);
    expect(s.stderr()).toMatch(/TLS: certificate .*server-cert\.pem expires in [01] days/);

    await roundTrip(`nbds://localhost:${port}/?tls-certificates=${pki.noclient}`);
    await roundTrip(`nbds+unix:///?socket=${sock}&tls-certificates=${pki.noclient}`);
    if (nbdinfo) {
      const tcp = await run('nbdinfo', ['--json', `nbds://localhost:${port}/?tls-certificates=${pki.noclient}`]);
      expect(tcp.code).toBe(0);
      expect(JSON.parse(tcp.stdout)).toMatchObject({ TLS: true, exports: [{ 'export-size': 4 * MiB }] });
      const unix = await run('nbdinfo', ['--is', 'tls', `nbds+unix:///?socket=${sock}&tls-certificates=${pki.noclient}`]);
      expect(unix.code).toBe(0);
    }
    if (qemu) {
      const creds = `tls-creds-x509,id=tls0,endpoint=client,dir=${pki.noclient}`;
      const opts = `driver=nbd,host=localhost,port=${port},tls-creds=tls0`;
      const w = await run('qemu-io', ['--object', creds, '--image-opts', opts, '-c', 'write -P 0xa5 64k 64k']);
      expect(w.code, w.stderr).toBe(0);
      const r = await run('qemu-io', ['--object', creds, '--image-opts', opts, '-c', 'read -P 0xa5 64k 64k']);
      expect(r.code, r.stderr).toBe(0);
      expect(r.stdout).not.toMatch(/Pattern verification failed/);
      const info = await run('qemu-img', ['info', '--output=json', '--object', `tls-creds-x509,id=tls0,endpoint=client,dir=${pki.noclient}`, '--image-opts', `driver=nbd,path=${sock},tls-creds=tls0,tls-hostname=localhost`]);
      expect(info.code, info.stderr).toBe(0);
      expect(JSON.parse(info.stdout)).toMatchObject({ 'virtual-size': 4 * MiB });
    }
    const st = await status(control);
    expect(st.tls).toMatchObject({ mode: 'require', kind: 'x509' });
    expect(st.exports[0]!.tls).toBe('require');
    const text = await runCli(['status', '--control', control]);
    expect(text.stdout).toMatch(/TLS: require for every export \(x509, certificates valid until /);
  });

  it('refusals: clear text to a require server, a client that trusts another CA, a wrong host name; nothing is served', async () => {
    const { s, port, control } = await serveTls(['--tls-certificates', pki.server]);
    expect(await refusal(`nbd://localhost:${port}/`)).toMatchObject({ code: 'ERR_NBD_TLS_REQUIRED' });
    const wrongCa = await refusal(`nbds://localhost:${port}/?tls-certificates=${pki.wrongca}`);
    expect(wrongCa).toMatchObject({ code: 'ERR_TLS_HANDSHAKE' });
    expect(wrongCa.message).toMatch(/not signed by a trusted CA|ends in a CA that is not trusted/);
    const wrongName = await refusal(`nbds://127.0.0.1:${port}/?tls-certificates=${pki.noclient}&tls-hostname=replica.example`);
    expect(wrongName).toMatchObject({ code: 'ERR_TLS_HANDSHAKE', details: { reason: 'ERR_TLS_CERT_ALTNAME_INVALID' } });
    if (nbdinfo) {
      const plain = await run('nbdinfo', [`nbd://localhost:${port}/`]);
      expect(plain.code).not.toBe(0);
    }
    const st = await status(control);
    expect(st.exports[0]).toMatchObject({ bytesRead: 0, bytesWritten: 0 });
    await waitFor(() => /TLS handshake failed/.test(s.stderr()), 'the refusal on stderr');
  });

  it('an expired server certificate: warned about at start; clients refuse it', async () => {
    const { s, port } = await serveTls(['--tls-certificates', pki.expired]);
    expect(s.stderr()).toMatch(/server-cert\.pem expired on/);
    const err = await refusal(`nbds://localhost:${port}/?tls-certificates=${pki.noclient}`);
    expect(err).toMatchObject({ code: 'ERR_TLS_HANDSHAKE', details: { reason: 'CERT_HAS_EXPIRED' } });
  });
});

describe('serve-nbd --tls-certificates --tls-authz (client certificates)', () => {
  it('the allowed DN gets in (our client, nbdinfo, qemu-img); no certificate, a rogue CA with the right DN, and a DN not in the list are refused and logged', async () => {
    const dir = await makeTempDir();
    const list = join(dir, 'authz');
    await writeFile(list, `# the replicas\n${CLIENT_DN}\n`);
    const { s, sock, port, control } = await serveTls(['--tls-certificates', pki.good, '--tls-authz', list]);
    expect(JSON.parse(s.listeningLine)).toMatchObject({ tls: { mode: 'require', kind: 'x509+verify-peer' } });
    await roundTrip(`nbds://localhost:${port}/?tls-certificates=${pki.client}`);
    if (nbdinfo) {
      const r = await run('nbdinfo', ['--size', `nbds+unix:///?socket=${sock}&tls-certificates=${pki.client}`]);
      expect(r.code, r.stderr).toBe(0);
      expect(r.stdout.trim()).toBe(String(4 * MiB));
    }
    if (qemu) {
      const r = await run('qemu-img', ['info', '--output=json', '--object', `tls-creds-x509,id=tls0,endpoint=client,dir=${pki.client}`, '--image-opts', `driver=nbd,host=localhost,port=${port},tls-creds=tls0`]);
      expect(r.code, r.stderr).toBe(0);
    }
    const before = (await status(control)).exports[0]!;

    expect((await refusal(`nbds://localhost:${port}/?tls-certificates=${pki.noclient}`)).code).toMatch(/^ERR_TLS_(REJECTED|HANDSHAKE)$/);
    // the node trap: a certificate from another CA with exactly the allowed DN
    expect((await refusal(`nbds://localhost:${port}/?tls-certificates=${pki.rogue}`)).code).toMatch(/^ERR_TLS_(REJECTED|HANDSHAKE)$/);
    await writeFile(list, 'C=GB,O=blkrep,CN=replica-b\n'); // re-read at the next connection
    s.child.kill('SIGHUP'); // what operators send after editing it: harmless, the daemon stays
    await waitFor(() => s.stderr().includes('SIGHUP: reloading'), 'the SIGHUP line');
    expect(s.child.exitCode).toBeNull();
    expect(await refusal(`nbds://localhost:${port}/?tls-certificates=${pki.client}`)).toMatchObject({ code: 'ERR_TLS_REJECTED' });
    await waitFor(() => s.stderr().includes(`its certificate's DN "${CLIENT_DN}" is not in the authz allow-list`), 'the authz refusal on stderr');
    expect(s.stderr()).toMatch(/connection \d+ from 127\.0\.0\.1:\d+: TLS handshake failed/);
    const after = (await status(control)).exports[0]!;
    expect(after.bytesRead).toBe(before.bytesRead);
    expect(after.bytesWritten).toBe(before.bytesWritten);
  });
});

describe('serve-nbd --tls-psk', () => {
  it('alice gets in over TCP and Unix (our client, nbdinfo, qemu-img); an unknown user and a wrong key are refused and logged without keys', async () => {
    const { s, sock, port, control } = await serveTls(['--tls-psk', pki.psk]);
    expect(JSON.parse(s.listeningLine)).toMatchObject({ tls: { mode: 'require', kind: 'psk' } });
    await roundTrip(`nbds://alice@localhost:${port}/?tls-psk-file=${pki.psk}`);
    await roundTrip(`nbds+unix:///?socket=${sock}&tls-psk-file=${pki.psk}&tls-username=alice`);
    if (nbdinfo) {
      const r = await run('nbdinfo', ['--size', `nbds://alice@localhost:${port}/?tls-psk-file=${pki.psk}`]);
      expect(r.code, r.stderr).toBe(0);
    }
    if (qemu) {
      // qemu's tls-creds-psk reads DIR/keys.psk
      const r = await run('qemu-img', ['info', '--object', `tls-creds-psk,id=tls0,endpoint=client,dir=${pki.root},username=alice`, '--image-opts', `driver=nbd,path=${sock},tls-creds=tls0`]);
      expect(r.code, r.stderr).toBe(0);
    }
    const before = (await status(control)).exports[0]!;
    const dir = await makeTempDir();
    const bob = join(dir, 'bob.psk');
    await writeFile(bob, `bob:${randomBytes(32).toString('hex')}\n`);
    expect((await refusal(`nbds://bob@localhost:${port}/?tls-psk-file=${bob}`)).code).toBe('ERR_TLS_HANDSHAKE');
    expect((await refusal(`nbds://alice@localhost:${port}/?tls-psk-file=${pki.wrongPsk}`)).code).toBe('ERR_TLS_HANDSHAKE');
    await waitFor(() => s.stderr().includes('unknown PSK user "bob"'), 'the unknown user on stderr');
    expect(s.stderr()).not.toContain(pki.pskKeyHex);
    const after = (await status(control)).exports[0]!;
    expect(after.bytesRead).toBe(before.bytesRead);
  });
});

describe('serve-nbd --tls flags: usage and credential errors', () => {
  const cases: Array<[string, () => string[], number, string, RegExp]> = [
    ['--tls require without credentials', () => ['--tls', 'require'], 2, 'ERR_USAGE', /--tls require needs credentials/],
    ['--tls-authz without credentials', () => ['--tls-authz', 'alice'], 2, 'ERR_USAGE', /need --tls-certificates DIR or --tls-psk FILE/],
    ['--tls off with credentials', () => ['--tls', 'off', '--tls-psk', pki.psk], 2, 'ERR_USAGE', /contradict/],
    ['--tls-verify-peer with PSK', () => ['--tls-psk', pki.psk, '--tls-verify-peer'], 2, 'ERR_USAGE', /--tls-verify-peer is for x509/],
    ['a missing allow-list file', () => ['--tls-certificates', pki.good, '--tls-authz', '/nonexistent/authz'], 2, 'ERR_USAGE', /--tls-authz \/nonexistent\/authz: no such file/],
    ['a missing certificates directory', () => ['--tls-certificates', '/nonexistent/pki'], 1, 'ERR_TLS_CREDENTIALS', /\/nonexistent\/pki: no such directory/],
  ];
  it.each(cases)('%s', async (_name, args, exit, code, message) => {
    const dir = await makeTempDir();
    const r = await runCli(['serve-nbd', 'memory:1M', '--socket', join(dir, 's'), '--json', ...args()]);
    expect(r.code).toBe(exit);
    const out = JSON.parse(r.stdout) as { error: { code: string; message: string } };
    expect(out.error.code).toBe(code);
    expect(out.error.message).toMatch(message);
  });
});

describe('serve-nbd TLS and SIGHUP', () => {
  it('SIGHUP re-reads the certificates (an expired one replaced: clients get in; events reload and tls-expiry); bad ones are refused and the old stay', async () => {
    const dir = await makeTempDir();
    const certs = join(dir, 'certs');
    await mkdir(certs);
    for (const f of ['ca-cert.pem', 'server-cert.pem', 'server-key.pem']) await copyFile(join(pki.expired, f), join(certs, f));
    const { s, port, control } = await serveTls(['--tls-certificates', certs]);
    expect(s.stderr()).toMatch(/server-cert\.pem expired on/);
    expect(await refusal(`nbds://localhost:${port}/?tls-certificates=${pki.noclient}`)).toMatchObject({ code: 'ERR_TLS_HANDSHAKE', details: { reason: 'CERT_HAS_EXPIRED' } });

    const events: Array<Record<string, unknown>> = [];
    const sub = await ControlClient.connect(control);
    try {
      await sub.subscribe(['reload', 'tls-expiry'], (e: Record<string, unknown>) => void events.push(e));
      // the renewed certificate (valid two days: still under 30, so tls-expiry says so)
      for (const f of ['server-cert.pem', 'server-key.pem']) await copyFile(join(pki.server, f), join(certs, f));
      s.child.kill('SIGHUP');
      await waitFor(() => events.some((e) => e.event === 'reload'), 'the reload event');
      expect(events.find((e) => e.event === 'reload')).toMatchObject({ what: ['TLS credentials'], failed: [] });
      const expiry = events.find((e) => e.event === 'tls-expiry');
      expect(expiry).toMatchObject({ event: 'tls-expiry', warnings: expect.arrayContaining([expect.stringMatching(/server-cert\.pem expires in [01] days/)]) });
      await roundTrip(`nbds://localhost:${port}/?tls-certificates=${pki.noclient}`);
      expect((await status(control)).tls).toMatchObject({ mode: 'require', kind: 'x509', notAfter: expiry!.notAfter });

      // a broken key: the reload fails with the reason, serving goes on with the certificate loaded before
      events.length = 0;
      await writeFile(join(certs, 'server-key.pem'), 'not a key\n');
      s.child.kill('SIGHUP');
      await waitFor(() => events.some((e) => e.event === 'reload'), 'the second reload event');
      const failed = events.find((e) => e.event === 'reload') as { what: string[]; failed: string[] };
      expect(failed.what).toEqual([]);
      expect(failed.failed.join('\n')).toMatch(/server-key\.pem: not a valid unencrypted PEM private key/);
      await waitFor(() => /reload failed, still serving as before: .*server-key\.pem/.test(s.stderr()), 'the failed reload on stderr');
      await roundTrip(`nbds://localhost:${port}/?tls-certificates=${pki.noclient}`);
    } finally {
      await sub.close();
    }
  });
});
