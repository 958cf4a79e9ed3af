/**
 * Our NBD client over TLS (nbds://, nbds+unix://) against the real TLS servers: nbdkit
 * (--tls=require, x509 with and without --tls-verify-peer, PSK) and qemu-nbd (--tls-creds x509
 * with --tls-authz, PSK). Data checked byte for byte; every refusal with its exact code, and no
 * data (the connection never reaches GO).
 */
import { randomBytes } from 'node:crypto';
import { writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { beforeAll, describe, expect, it } from 'vitest';
import type { BlkrepError } from '../../src/api/errors.js';
import { NbdClient } from '../../src/nbd/client.js';
import { hasTool, makeTempDir, runCli, start, waitFor, type Started } from '../support/spawn.js';
import { freePort, makePki, type Pki } from '../support/tls-pki.js';

const MiB = 1024 * 1024;
let pki: Pki;

beforeAll(async () => {
  pki = makePki(await makeTempDir('file'));
});

async function connect(uri: string): Promise<NbdClient> {
  return NbdClient.connect({ uri, reconnect: false, holdMs: 0, connectTimeoutMs: 10_000 });
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

/** Wait until a server answers on `sock` (the file exists and accepts). */
async function ready(server: Started, probeUri: string): Promise<void> {
  await waitFor(async () => {
    if (server.child.exitCode !== null) throw new Error(`server exited: ${server.stderr()}`);
    const c = await connect(probeUri);
    await c.close();
    return true;
  }, `a TLS server on ${probeUri}`);
}

async function roundTrip(uri: string): Promise<void> {
  const c = await connect(uri);
  try {
    const data = randomBytes(64 * 1024);
    await c.write(4096, data);
    await c.flush();
    const back = Buffer.alloc(data.length);
    await c.read(4096, back);
    expect(back.equals(data)).toBe(true);
  } finally {
    await c.close();
  }
}

describe.runIf(hasTool('nbdkit'))('our client → nbdkit --tls=require', () => {
  it('x509 over TCP and Unix: bytes round-trip; refusals: no TLS asked, wrong CA, wrong host name, expired certificate', async () => {
    const dir = await makeTempDir();
    const port = await freePort();
    const sock = join(dir, 's');
    const tcp = start('nbdkit', ['-f', '-i', '127.0.0.1', '-p', String(port), '--tls=require', `--tls-certificates=${pki.server}`, 'memory', '1M']);
    const unix = start('nbdkit', ['-f', '-U', sock, '--tls=require', `--tls-certificates=${pki.server}`, 'memory', '1M']);
    const good = `nbds://localhost:${port}/?tls-certificates=${pki.noclient}`;
    await ready(tcp, good);
    await roundTrip(good);
    await roundTrip(`nbds://127.0.0.1:${port}/?tls-certificates=${pki.noclient}`); // the IP is in the SANs
    const unixUri = `nbds+unix:///?socket=${sock}&tls-certificates=${pki.noclient}`;
    await ready(unix, unixUri);
    await roundTrip(unixUri);

    const plain = await refusal(`nbd://localhost:${port}/`);
    expect(plain).toMatchObject({ code: 'ERR_NBD_TLS_REQUIRED', errno: 'EPERM' });
    const wrongCa = await refusal(`nbds://localhost:${port}/?tls-certificates=${pki.wrongca}`);
    expect(wrongCa).toMatchObject({ code: 'ERR_TLS_HANDSHAKE', details: { reason: expect.stringMatching(/UNABLE_TO_VERIFY_LEAF_SIGNATURE|SELF_SIGNED|UNABLE_TO_GET_ISSUER/) } });
    expect(wrongCa.message).toMatch(/not signed by a trusted CA/);
    const wrongName = await refusal(`nbds://localhost:${port}/?tls-certificates=${pki.noclient}&tls-hostname=other.example`);
    expect(wrongName).toMatchObject({ code: 'ERR_TLS_HANDSHAKE', details: { reason: 'ERR_TLS_CERT_ALTNAME_INVALID' } });
    expect(wrongName.message).toMatch(/does not name the host/);
    // tls-verify-peer=false: the name and the CA are not checked (as libnbd)
    await roundTrip(`nbds://localhost:${port}/?tls-certificates=${pki.wrongca}&tls-verify-peer=false&tls-hostname=other.example`);

    const expiredPort = await freePort();
    const expired = start('nbdkit', ['-f', '-i', '127.0.0.1', '-p', String(expiredPort), '--tls=require', `--tls-certificates=${pki.expired}`, 'memory', '1M']);
    const err = await waitFor(async () => {
      if (expired.child.exitCode !== null) throw new Error(`nbdkit exited: ${expired.stderr()}`);
      const e = await refusal(`nbds://localhost:${expiredPort}/?tls-certificates=${pki.noclient}`);
      return e.code === 'ERR_NBD_CONNECT' ? undefined : e; // not listening yet
    }, 'nbdkit with an expired certificate');
    expect(err).toMatchObject({ code: 'ERR_TLS_HANDSHAKE', details: { reason: 'CERT_HAS_EXPIRED' } });
    expect(err.message).toMatch(/expired/);
  });

  it('x509 with --tls-verify-peer: our client certificate is accepted; none, or a rogue one with the right DN, is refused', async () => {
    const port = await freePort();
    const s = start('nbdkit', ['-f', '-i', '127.0.0.1', '-p', String(port), '--tls=require', '--tls-verify-peer', `--tls-certificates=${pki.good}`, 'memory', '1M']);
    const good = `nbds://localhost:${port}/?tls-certificates=${pki.client}`;
    await ready(s, good);
    await roundTrip(good);
    for (const dir of [pki.noclient, pki.rogue]) {
      const err = await refusal(`nbds://localhost:${port}/?tls-certificates=${dir}`);
      expect(err.code).toMatch(/^ERR_TLS_(REJECTED|HANDSHAKE)$/);
      expect(err.errno).toBe('EPERM');
    }
  });

  it('PSK over TCP: the right key works; a wrong key, an unknown user, and a user missing from our file are refused', async () => {
    const dir = await makeTempDir();
    const port = await freePort();
    const s = start('nbdkit', ['-f', '-i', '127.0.0.1', '-p', String(port), '--tls=require', `--tls-psk=${pki.psk}`, 'memory', '1M']);
    const good = `nbds://alice@localhost:${port}/?tls-psk-file=${pki.psk}`;
    await ready(s, good);
    await roundTrip(good);
    expect(await refusal(`nbds://alice@localhost:${port}/?tls-psk-file=${pki.wrongPsk}`)).toMatchObject({ code: 'ERR_TLS_HANDSHAKE', errno: 'EPERM' });
    const bobFile = join(dir, 'bob.psk');
    await writeFile(bobFile, `bob:${randomBytes(32).toString('hex')}\n`);
    expect(await refusal(`nbds://bob@localhost:${port}/?tls-psk-file=${bobFile}`)).toMatchObject({ code: 'ERR_TLS_HANDSHAKE', errno: 'EPERM' });
    const missing = await refusal(`nbds://carol@localhost:${port}/?tls-psk-file=${pki.psk}`);
    expect(missing).toMatchObject({ code: 'ERR_TLS_CREDENTIALS' });
    expect(missing.message).toMatch(/has no key for PSK user "carol"/);
  });

  it('nbds:// to a server without TLS fails; it never goes on in clear', async () => {
    const dir = await makeTempDir();
    const sock = join(dir, 's');
    const s = start('nbdkit', ['-f', '-U', sock, '--tls=off', 'memory', '1M']);
    await waitFor(async () => {
      if (s.child.exitCode !== null) throw new Error(s.stderr());
      const c = await connect(`nbd+unix:///?socket=${sock}`);
      await c.close();
      return true;
    }, 'nbdkit');
    const err = await refusal(`nbds+unix:///?socket=${sock}&tls-certificates=${pki.noclient}`);
    expect(err).toMatchObject({ code: 'ERR_NBD_TLS_UNSUPPORTED', errno: 'EPERM' });
    expect(err.message).toMatch(/does not offer TLS/);
  });

  it('blkrep info takes nbds:// URIs; a refusal exits 1 with its code in --json', async () => {
    const port = await freePort();
    const s = start('nbdkit', ['-f', '-i', '127.0.0.1', '-p', String(port), '--tls=require', `--tls-certificates=${pki.server}`, 'memory', '1M']);
    const uri = `nbds://localhost:${port}/?tls-certificates=${pki.noclient}`;
    await ready(s, uri);
    const info = await runCli(['info', uri, '--json']);
    expect(info.code).toBe(0);
    expect(JSON.parse(info.stdout)).toMatchObject({ 'virtual-size': MiB });
    const bad = await runCli(['info', `nbds://localhost:${port}/?tls-certificates=${pki.wrongca}`, '--json']);
    expect(bad.code).toBe(1);
    expect(JSON.parse(bad.stdout)).toMatchObject({ error: { code: 'ERR_TLS_HANDSHAKE' } });
  });
});

describe.runIf(hasTool('qemu-nbd'))('our client → qemu-nbd --tls-creds', () => {
  async function qemuNbd(args: string[], probe: string): Promise<Started> {
    const dir = await makeTempDir();
    const img = join(dir, 'disk.img');
    await writeFile(img, Buffer.alloc(MiB));
    const s = start('qemu-nbd', [...args, '-f', 'raw', '-t', img]);
    await ready(s, probe);
    return s;
  }

  it('x509 with verify-peer and an authz allow-list naming our DN: bytes round-trip', async () => {
    const port = await freePort();
    const uri = `nbds://localhost:${port}/?tls-certificates=${pki.client}`;
    await qemuNbd(
      [
        '--object', `tls-creds-x509,id=tls0,endpoint=server,dir=${pki.good},verify-peer=on`,
        '--object', 'authz-simple,id=auth0,identity=C=GB,,O=blkrep,,CN=replica-a',
        '--tls-creds', 'tls0', '--tls-authz', 'auth0', '-b', '127.0.0.1', '-p', String(port),
      ],
      uri,
    );
    await roundTrip(uri);
  });

  it('a DN not in its allow-list is refused after the handshake: ERR_TLS_REJECTED', async () => {
    const port = await freePort();
    const img = join(await makeTempDir(), 'disk.img');
    await writeFile(img, Buffer.alloc(MiB));
    const s = start('qemu-nbd', [
      '--object', `tls-creds-x509,id=tls0,endpoint=server,dir=${pki.good},verify-peer=on`,
      '--object', 'authz-simple,id=auth0,identity=C=GB,,O=blkrep,,CN=replica-b',
      '--tls-creds', 'tls0', '--tls-authz', 'auth0', '-b', '127.0.0.1', '-p', String(port), '-f', 'raw', '-t', img,
    ]);
    const err = await waitFor(async () => {
      if (s.child.exitCode !== null) throw new Error(s.stderr());
      const e = await refusal(`nbds://localhost:${port}/?tls-certificates=${pki.client}`);
      return e.code === 'ERR_NBD_CONNECT' ? undefined : e;
    }, 'qemu-nbd');
    expect(err).toMatchObject({ code: 'ERR_TLS_REJECTED', errno: 'EPERM' });
  });

  it('PSK over a Unix socket: bytes round-trip', async () => {
    const dir = await makeTempDir();
    const sock = join(dir, 's');
    const uri = `nbds+unix:///?socket=${sock}&tls-psk-file=${pki.psk}&tls-username=alice`;
    // qemu's tls-creds-psk reads DIR/keys.psk
    await qemuNbd(['--object', `tls-creds-psk,id=tls0,endpoint=server,dir=${pki.root}`, '--tls-creds', 'tls0', '-k', sock], uri);
    await roundTrip(uri);
  });
});
