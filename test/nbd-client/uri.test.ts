/**
 * NBD URI parsing (doc/uri.md): a table of valid URIs with what they mean, and of invalid ones
 * with the error each gets.
 */
import { describe, expect, it } from 'vitest';
import { BlkrepError } from '../../src/api/errors.js';
import { isNbdUri, parseNbdUri } from '../../src/nbd/uri.js';

const VALID: Array<[string, Record<string, unknown>]> = [
  ['nbd://example.com/disk', { transport: 'tcp', host: 'example.com', port: 10809, exportName: 'disk', address: 'example.com:10809' }],
  ['nbd://example.com', { host: 'example.com', port: 10809, exportName: '' }],
  ['nbd://example.com/', { exportName: '' }],
  ['nbd://example.com//disk', { exportName: '/disk' }],
  ['nbd://example.com/hello%20world', { exportName: 'hello world' }],
  ['nbd://example.com/a+b', { exportName: 'a+b' }],
  ['nbd://example.com/%C3%A9t%C3%A9', { exportName: 'été' }],
  ['nbd://example.com/a/b/c', { exportName: 'a/b/c' }],
  ['nbd://10.0.0.1:1234/x', { host: '10.0.0.1', port: 1234, address: '10.0.0.1:1234' }],
  ['nbd://example.com:/x', { port: 10809 }],
  ['nbd://[::1]/x', { host: '::1', port: 10809, address: '[::1]:10809' }],
  ['nbd://[::1]:10810/', { host: '::1', port: 10810, address: '[::1]:10810', exportName: '' }],
  ['nbd://[fe80::1%25eth0]:99/x', { host: 'fe80::1%eth0', port: 99 }],
  ['nbd:///x', { host: 'localhost', port: 10809, exportName: 'x' }],
  ['NBD://Example.com/x', { scheme: 'nbd', host: 'Example.com' }],
  ['nbd://user@example.com/x', { host: 'example.com', user: 'user' }],
  ['nbd://example.com/x?x-debug=1', { exportName: 'x' }],
  ['nbd+unix:///disk?socket=/tmp/nbd.sock', { scheme: 'nbd+unix', transport: 'unix', socket: '/tmp/nbd.sock', address: '/tmp/nbd.sock', exportName: 'disk' }],
  ['nbd+unix:///?socket=nbd.sock', { socket: 'nbd.sock', exportName: '' }],
  ['nbd+unix://?socket=s', { socket: 's', exportName: '' }],
  ['nbd+unix:///?socket=%00/abstract', { socket: '\0/abstract' }],
  ['nbd+unix:///x?socket=/tmp/a%20b%2Bc+d.sock', { socket: '/tmp/a b+c+d.sock' }],
  ['nbd+unix:///x?socket=/tmp/s&x-foo=bar', { socket: '/tmp/s' }],
  ['nbd+unix:///%2Fslash?socket=s', { exportName: '/slash' }],
  // TLS: the libnbd query keys become the upgrader's settings; the host is the name checked
  ['nbds://example.com/x?tls-certificates=/etc/pki', { scheme: 'nbds', transport: 'tcp', tls: { settings: { 'tls-certificates': '/etc/pki', 'tls-hostname': 'example.com' } } }],
  ['nbds://alice@127.0.0.1:10810/?tls-psk-file=/k.psk', { port: 10810, tls: { settings: { 'tls-psk-file': '/k.psk', 'tls-username': 'alice', 'tls-hostname': '127.0.0.1' } } }],
  ['nbds://alice@h/?tls-psk-file=k&tls-username=bob', { tls: { settings: { 'tls-username': 'bob' } } }],
  ['nbds://h/?tls-verify-peer=false&tls-hostname=other.example', { tls: { settings: { 'tls-verify-peer': 'false', 'tls-hostname': 'other.example' } } }],
  ['nbds+unix:///d?socket=/s&tls-certificates=/p', { scheme: 'nbds+unix', transport: 'unix', socket: '/s', exportName: 'd', tls: { settings: { 'tls-certificates': '/p', 'tls-hostname': 'localhost' } } }],
];

const INVALID: Array<[string, string, RegExp]> = [
  ['nbds://example.com/x?tls-certificates=a&tls-psk-file=b', 'ERR_BAD_URI', /tls-certificates \(x509\) or tls-psk-file \(PSK\), not both/],
  ['nbds://example.com/x?tls-verify-peer=maybe', 'ERR_BAD_URI', /tls-verify-peer is "maybe"; expected true or false/],
  ['nbds://example.com/x?tls-certificates=', 'ERR_BAD_URI', /tls-certificates is empty/],
  ['nbds://example.com/x?tls-type=x509', 'ERR_BAD_URI', /"tls-type" is not supported/],
  ['nbds+unix:///x', 'ERR_BAD_URI', /nbds\+unix:\/\/ needs the socket path/],
  ['nbds://example.com/x?socket=/s', 'ERR_BAD_URI', /"socket" belongs to nbds\+unix/],
  ['http://example.com/x', 'ERR_BAD_URI', /scheme "http" is not supported/],
  ['nbd+vsock://2:10809/x', 'ERR_BAD_URI', /scheme "nbd\+vsock"/],
  ['nbd:example.com', 'ERR_BAD_URI', /expected "nbd:\/\/"/],
  ['nbd://example.com:0/x', 'ERR_BAD_URI', /port 0 is not between 1 and 65535/],
  ['nbd://example.com:65536/x', 'ERR_BAD_URI', /port 65536/],
  ['nbd://example.com:12ab/x', 'ERR_BAD_URI', /cannot read host and port/],
  ['nbd://::1/x', 'ERR_BAD_URI', /IPv6 addresses in brackets/],
  ['nbd://[zz]/x', 'ERR_BAD_URI', /not an IPv6 address/],
  ['nbd://example.com/x#frag', 'ERR_BAD_URI', /fragment/],
  ['nbd://example.com/%zz', 'ERR_BAD_URI', /%XX escape/],
  ['nbd://example.com/%C3', 'ERR_BAD_URI', /not valid percent-encoded UTF-8/],
  ['nbd://example.com/a%00b', 'ERR_BAD_URI', /NUL/],
  [`nbd://example.com/${'a'.repeat(4097)}`, 'ERR_BAD_URI', /4097 bytes long/],
  ['nbd://example.com/x?socket=/tmp/s', 'ERR_BAD_URI', /"socket" belongs to nbd\+unix/],
  ['nbd://example.com/x?tls-certificates=/p', 'ERR_BAD_URI', /"tls-certificates" is a TLS setting: use nbds:\/\//],
  ['nbd+unix:///x?socket=s&tls-psk-file=/k', 'ERR_BAD_URI', /"tls-psk-file" is a TLS setting: use nbds\+unix:\/\//],
  ['nbd://example.com/x?foo=1', 'ERR_BAD_URI', /unknown query parameter "foo"/],
  ['nbd+unix:///x', 'ERR_BAD_URI', /needs the socket path/],
  ['nbd+unix:///x?socket=', 'ERR_BAD_URI', /needs the socket path/],
  ['nbd+unix:///x?socket=%00', 'ERR_BAD_URI', /abstract socket name after %00 is empty/],
  ['nbd+unix://host/x?socket=s', 'ERR_BAD_URI', /take no host/],
  ['nbd+unix:///x?socket=a&socket=b', 'ERR_BAD_URI', /given twice/],
  ['', 'ERR_BAD_URI', /expected nbd:\/\/host/],
];

describe('NBD URI parsing', () => {
  it.each(VALID)('%s', (uri, expected) => {
    const parsed = parseNbdUri(uri);
    expect(parsed).toMatchObject(expected);
    expect(parsed.uri).toBe(uri);
  });

  it.each(INVALID)('%s → %s', (uri, code, message) => {
    let err: unknown;
    try {
      parseNbdUri(uri);
    } catch (e) {
      err = e;
    }
    expect(err).toBeInstanceOf(BlkrepError);
    expect((err as BlkrepError).code).toBe(code);
    expect((err as BlkrepError).errno).toBe('EINVAL');
    expect((err as BlkrepError).message).toMatch(message);
  });

  it('messages never carry raw control characters', () => {
    let err: BlkrepError | undefined;
    try {
      parseNbdUri('nbd+unix:///x?socket=%00&bad=1');
    } catch (e) {
      err = e as BlkrepError;
    }
    expect(err?.message).toMatch(/unknown query parameter "bad"/);
    expect(err?.message).not.toMatch(/\0/);
  });

  it('isNbdUri knows every NBD scheme and nothing else', () => {
    for (const u of ['nbd://h/x', 'nbds://h/x', 'nbd+unix:///x?socket=s', 'NBDS+UNIX:///x']) expect(isNbdUri(u)).toBe(true);
    for (const u of ['/dev/sda', 'memory:1G', 'raw:/x', 'http://h/', 'nbdx://h']) expect(isNbdUri(u)).toBe(false);
  });
});
