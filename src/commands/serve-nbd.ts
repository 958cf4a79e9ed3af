import { resolve as resolvePath } from 'node:path';
import { existsSync, rmSync } from 'node:fs';
import { Args, Flags } from '@oclif/core';
import { BlkrepCommand, loadRegistries } from '../cli/base.js';
import { heartbeatFlags, parseHeartbeatFlags } from '../cli/heartbeat-flags.js';
import { durationFlag, secondsFlag, sizeFlag } from '../cli/flags.js';
import { parseNbdUri } from '../nbd/uri.js';
import { filterFlag, parseFilters } from '../cli/image.js';
import { ensureRunDirFor, prepareControlPath } from '../cli/control-path.js';
import { Daemon, type DaemonTls, type ExportSpec, type ListenSpec, type ListeningEvent } from '../serve/daemon.js';
import type { UpgraderRegistry } from '../api/transport.js';
import type { BitmapLoad } from '../bitmap/export-bitmaps.js';
import { DEFAULT_MAX_BUFFER, type LogLevel } from '../nbd/server.js';
import { MAX_PAYLOAD } from '../nbd/constants.js';
import { formatSize } from '../util/size.js';
import { secondarySetup } from '../pair/secondary.js';
import { parseMetricsAddress } from '../serve/metrics.js';
import { daemonLogger, type LogFormat } from '../cli/log-format.js';
import { setStateDir } from '../util/state-dir.js';
import { applyConfig, type CommandShape } from '../config/file.js';
import { notifySystemd } from '../cli/systemd-notify.js';
import { parseAfterSb0, type AfterSb0Policy } from '../pair/split-brain.js';

/** The embedded default: what `blkrep serve-nbd` serves when given no image. */
export const DEFAULT_IMAGE = 'memory:1G';
export const DEFAULT_PORT = 10809;

export default class ServeNbd extends BlkrepCommand {
  static override summary = 'Serve images over NBD.';

  static override description = `Serves one image as the default export (name "", or --name), or several with --export, to any NBD client: qemu, nbdinfo, nbdcopy, nbdkit's nbd plugin, the kernel's nbd-client.
With no image, serves the embedded default: a 1 GiB sparse in-memory disk.

An image is a raw file or block device (holes are reported by block status and punched by trim and write-zeroes) or memory:SIZE.

Listens on TCP 127.0.0.1:10809 unless --socket names a Unix socket (give --port too to listen on both). The socket file and the --pid-file are created mode 0600 whatever the umask, so only the daemon's user can connect or read them; --socket-mode widens the socket's deliberately (0660: its group too). The pid file is written under a random temporary name and renamed into place: a symlink planted at its path is replaced, never followed. Export names (--name, --export) may not hold a control character, start with "/" or hold ".." as a path component (error ERR_EXPORT_NAME). With --json, prints one line {"event":"listening","uris":[...],"pid":N} on stdout once clients can connect (a secondary's uris are empty: its replica export appears when a primary connects; blkrep status shows the addresses it listens on).

Dirty bitmaps: --bitmap NAME records every write, write-zeroes and trim of the export in a bitmap, offered to clients as the meta context qemu:dirty-bitmap:NAME (nbdinfo --map=qemu:dirty-bitmap:NAME). It is kept in the file IMAGE.NAME.bitmap beside the image (created when missing), or in FILE with --bitmap NAME=FILE; an in-memory image (or an NBD URI) keeps it in memory unless FILE is given. With several exports, say whose: --bitmap EXPORT:NAME[=FILE]. Every bitmap file beside an image (IMAGE.*.bitmap) is loaded too, unless --no-auto-bitmaps. A bitmap that was not closed cleanly is recovered from its activity log, and one that cannot be trusted is loaded all-dirty; either is said on stderr and in the --json listening line ("bitmaps": [...]). The blkrep bitmap commands work on them through --control.

Jobs: with --control, blkrep mirror --control starts a live mirror of an export, and the blkrep job commands steer it (blkrep events prints the job events). A job of an export whose image is a file keeps its state and dirty bitmap beside the image (IMAGE.job-ID.json, IMAGE.job-ID.dirty); at start, every such job is loaded paused before any client connects (its writes are tracked from the first one), listed in the --json listening line ("jobs": [...]) and said on stderr; blkrep job resume continues it, copying only what is still dirty. A state file that cannot be loaded is renamed IMAGE.job-ID.json.failed.

Limits: at most --shared connections; when full, a new connection takes the place of the oldest one still in the handshake (if at least a second old). Request payloads and unsent replies of all connections together stay under --max-buffer: over it, connections are not read until there is room, first come first served (each may hold 256 KiB beyond it, so small requests never wait). A client that makes the server hold over 1 MiB (replies it does not read, a write payload it stopped sending) and makes no progress for --stall-timeout seconds is disconnected, with the reason on stderr and in the disconnect event.

Heartbeat: with --heartbeat URI (repeatable, one per path) and --peer-id, the daemon beats to its peer once per --heartbeat-interval and watches the peer's beats: udp://PEER:PORT (the default kind; several NICs are several paths), tcp://PEER:PORT, file:///PATH (a slot each in a shared file), exec:COMMAND (a probe: exit 0 is a beat) or etcd://HOST:PORT/PREFIX (a key each in etcd). Beats carry the node id, an incarnation, a sequence number, the epoch and the generation, signed with HMAC-SHA256 and --heartbeat-key; once the peer says it decodes beat version 2 (version 1 peers, in a rolling upgrade, keep being sent version 1), they also carry each paired export's generation and whether this node's disk for it is Outdated, named by the secondary's replica export name (give each pair of one primary daemon its own: --name on the secondary; event peer-outdated when the peer reports a disk Outdated); a beat with another key, from another node, or replayed is refused and counted. The peer is suspect when it is late and dead only when every path is silent: after --heartbeat-misses intervals (--detector fixed, the default: 0.5 s x 5, so a dead peer is declared within 3 s) or at --phi-threshold (--detector phi). A peer never heard is "unknown", never dead. The pair link is a path too: each side pings its peer on it once per interval and a pong counts as a beat, so a peer that still answers on the replication link is never declared dead (event heartbeat-paths-down when every heartbeat path is dead but the link answers, heartbeat-paths-up when one is heard again). blkrep status shows each path's last beat, phi and state (and heartbeat.link); blkrep events prints peer-alive, peer-suspect and peer-dead. With --auto-failover, a dead peer is fenced by --fence-hook (DRBD fence-peer exit codes; only 4 "outdated" and 7 "fenced" go on) and then the failover verb is called, never forced; a daemon that is not a pair's secondary has no failover verb and says so (event auto-failover, code ERR_NO_FAILOVER). A failover the secondary would refuse is said before fencing, and nothing is fenced (event auto-failover with the refusal's code, e.g. ERR_PAIR_OUTDATED): a secondary whose pair link is down and that hears its primary announce another generation (the primary lost its peer and writes alone) is Outdated. A checkpoint in flight is finished first (event failover-deferred). Beats carry a term (the fencing token: a node that takes over announces the highest it heard + 1; with --lease, at least the create revision of the leader key it holds) and a primary flag; terms are kept in IMAGE.term.json beside the first export's image (a block device's in the --state-dir), so a primary replaced while it was away starts demoted (a damaged file: ERR_BAD_TERM_FILE); a primary that hears its peer announce itself primary with a higher term is demoted: every write fails with EIO (ERR_DEMOTED, event demoted). On a primary: --on-no-quorum suspend-io|io-error stops writes once neither the peer nor a witness (any path) was heard within interval x (misses - 1), checked on every write (after this process itself stalled past that window, e.g. SIGSTOP or a paused VM, the beats read in the next two intervals give no quorum: they may have been sent before the peer took over); --fencing resource-and-stonith freezes writes when the peer is dead or the data link to it is lost (as DRBD: the writes in flight at the cut are not acknowledged either; the hook runs once per loss, never twice at once) until --fence-hook says 4 or 7, the link is back (event io-resumed, by link-back), the secondary reports its disk for that export Outdated after the loss (beat version 2; by peer-outdated), or blkrep resume-io; resource-only runs the hook without freezing. With dont-care (the default) a primary that loses its link acknowledges writes its secondary never gets, and if it dies before its next beat tells the secondary (up to one interval; longer if the heartbeat is cut too), an automatic failover promotes the last checkpoint without them: resource-and-stonith closes that window. --lease etcd://HOST:PORT/PREFIX keeps leadership on etcd: the primary holds a lease and PREFIX/leader and stops writing at its own deadline (last keep-alive + TTL - TTL/4; ERR_LEASE_LOST); a secondary with --auto-failover takes the key before failing over (then --fence-hook may be left out).
TLS (as qemu-nbd --tls-creds and nbdkit --tls): --tls-certificates DIR (x509: ca-cert.pem, server-cert.pem, server-key.pem, as qemu's tls-creds-x509 dir= expects) or --tls-psk FILE (psktool's username:hexkey lines) turns on --tls require: every option but STARTTLS and ABORT is refused with NBD_REP_ERR_TLS_REQD until TLS is up, so nothing leaves in clear (--tls on also lets clients stay in clear; --tls off never offers TLS). Clients connect with nbds:// URIs (nbdinfo "nbds://localhost?tls-certificates=DIR"; qemu with --object tls-creds-x509,...,endpoint=client). TLS 1.3, or 1.2 at least. --tls-verify-peer asks every client for a certificate signed by ca-cert.pem; --tls-authz lets in only the clients named in a file (one per line: the certificate's DN as qemu writes it, C=GB,O=blkrep,CN=replica-a, or a PSK user name; re-read whenever it changes) or given directly; it implies --tls-verify-peer with x509. A refused client is logged on stderr with its address and the reason (a certificate not signed by the CA, a DN or PSK user not allowed, a wrong PSK key), never key material. Credentials are checked at start (error ERR_TLS_CREDENTIALS); a certificate that expires within 30 days is warned about on stderr and in the --json listening line ("tls": {"mode", "kind", "notAfter", "warnings"}); with --tls require the listening line's URIs are nbds:// ones. blkrep status says the mode for each export. SIGHUP re-reads the credentials (renewed certificates, the PSK file, the allow-list) for the connections from then on; bad ones are refused (event reload, failed) and the old stay. Event tls-expiry (notAfter, warnings) says a certificate expires within 30 days: at each SIGHUP and once a day. The pair over TLS: --replicate-to nbds://HOST/EXPORT?tls-certificates=DIR (client-cert.pem in DIR for a secondary with --tls-verify-peer or --tls-authz) or ?tls-psk-file=FILE&tls-username=NAME; the pair link and the data connection send STARTTLS first and never fall back to clear text; a refusal is said on stderr and as event pair-refused, and the primary keeps retrying.
Replication (the primary of a pair, see blkrep-replicate(1)): --replicate-to URI forwards every write, write-zeroes and trim to the secondary's replica export; reads stay local. --protocol sync completes a write when both disks have it (a FLUSH is end to end); async completes it after the local write and forwards in order through a bounded --queue (the secondary's disk is always a state this disk was in). When a write does not fit in the queue (the secondary or the link is slower than the writers), --on-congestion block (the default, as DRBD's) makes it wait for room: writes slow to the secondary's pace and it stays UpToDate, with no resync; status shows the waits (pair.congestion) and the events replication-congested and replication-uncongested bracket them; a secondary that replies to nothing for --congestion-timeout (10 s) while a write waits degrades replication as a lost link does, so a hung peer never holds a write longer. --on-congestion pull-ahead degrades at once instead (reason queue-full): writes never wait, and a resync by the peer bitmap follows. Both flags are refused with --protocol sync, which has no queue. A forwarding failure never fails a client's write: forwarding stops, the regions the secondary misses are kept in the peer bitmap IMAGE.pair.dirty (crash-safe), the event replication-degraded says why, and the daemon reconnects (100 ms doubling to 10 s, ±20 %) and resyncs by that bitmap before forwarding again. The first replication of a disk copies it whole. A plain NBD server as the target (qemu-nbd, nbdkit) works without checkpoints, said on stderr. The pair state is kept in IMAGE.pair.json; for a disk that is a block device the pair files (state, peer bitmap, a secondary's hidden and active disks, salvage images) go to the state directory instead of /dev, which is empty after a boot: --state-dir, else $BLKREP_STATE_DIR, else systemd's $STATE_DIRECTORY, else /var/lib/blkrep, named by the device path as systemd-escape --path writes it (/dev/vdb: dev-vdb.pair.json; name the disk by a stable path such as /dev/disk/by-id/NAME). blkrep status --json shows exports[i].pair.

Metrics: --metrics HOST:PORT (or unix:PATH) serves Prometheus text on GET /metrics: per export requests, bytes, errors, connections and a request latency histogram; dirty bitmap bytes; job progress; the pair's link state, queue, bytes behind, epoch and checkpoint age; heartbeat state and phi; the process's CPU and memory (names in README "Metrics and logs"). The listening line says where ("metrics"). Log lines on stderr start with the time (ISO 8601, UTC) and the level (debug, info, warn); when stderr is the journal (systemd's JOURNAL_STREAM) they start with the priority <7>, <6> or <4> instead and journald adds the time. --log-format json writes each stderr log line as one JSON object with the keys time, level, pid and message.
Config file: --config FILE reads flags from a YAML (or JSON, for a .json name) mapping whose keys are the long flag names and "image" (e.g. image: /dev/vdb, port: 10809, secondary: true, heartbeat: [udp://10.0.0.1:7000]); a flag given on the command line replaces the file's value (a repeatable flag: its whole list). A bad file is refused before anything starts, with the file, line, key and what was expected (error ERR_CONFIG, exit 2); blkrep config check FILE checks one without starting. blkrep setup writes one, with a systemd unit that runs serve-nbd --config /etc/blkrep/NAME.yaml.

SIGTERM or SIGINT stops accepting connections, finishes the requests in flight, flushes every export and its bitmaps, pauses every job (a persistent one keeps its files for the next start) and exits 0; a second signal exits at once.`;

  static override examples = [
    { description: 'Serve what /etc/blkrep/pair0.yaml says (as blkrep@pair0.service does), but on another port', command: '<%= config.bin %> <%= command.id %> --config /etc/blkrep/pair0.yaml --port 10810' },
    { description: 'Serve the embedded 1 GiB in-memory disk on 127.0.0.1:10809', command: '<%= config.bin %> <%= command.id %>' },
    { description: 'Serve a raw file on a Unix socket', command: '<%= config.bin %> <%= command.id %> disk.img --socket /run/blkrep/nbd.sock' },
    { description: 'Test a client against a failing disk: writes into the second MiB fail with ENOSPC (see blkrep-filters(7))', command: '<%= config.bin %> <%= command.id %> disk.img --socket /tmp/nbd.sock --filter error:ops=write,range=1M-2M,errno=ENOSPC' },
    { description: "Serve on a Unix socket the daemon's group may connect to", command: '<%= config.bin %> <%= command.id %> disk.img --socket /run/blkrep/nbd.sock --socket-mode 0660' },
    { description: 'Serve two exports read-only on port 10810, with a control socket', command: '<%= config.bin %> <%= command.id %> --export a=a.img --export b=/dev/vdb --read-only --port 10810 --control /run/blkrep/ctl.sock' },
    { description: 'Start from a script and wait until it listens', command: '<%= config.bin %> <%= command.id %> disk.img --json --pid-file /run/blkrep.pid | head -n 1' },
    { description: 'Track writes in the dirty bitmap disk.img.b0.bitmap and offer it as qemu:dirty-bitmap:b0', command: '<%= config.bin %> <%= command.id %> disk.img --bitmap b0 --socket /run/blkrep/nbd.sock --control /run/blkrep/ctl.sock' },
    { description: 'Let clients hold up to 1 GiB of payloads and replies together; disconnect one that stops reading its replies for 5 minutes', command: '<%= config.bin %> <%= command.id %> disk.img --socket /run/blkrep/nbd.sock --max-buffer 1G --stall-timeout 300' },
    { description: 'Watch the peer over two NICs by udp, with signed beats; a dead peer is declared within 3 s', command: '<%= config.bin %> <%= command.id %> disk.img --control /run/blkrep/ctl.sock --node-id nodeB --peer-id nodeA --heartbeat udp://10.0.0.1:7000 --heartbeat udp://10.1.0.1:7000 --heartbeat-key /etc/blkrep/pair.key' },
    { description: 'Fence a dead peer through a DRBD-style handler, then fail over to this node', command: "<%= config.bin %> <%= command.id %> disk.img --control /run/blkrep/ctl.sock --peer-id nodeA --heartbeat udp://10.0.0.1:7000 --detector phi --auto-failover --fence-hook '/usr/lib/drbd/stonith_admin-fence-peer.sh'" },
    { description: 'Serve over TLS with x509 certificates (qemu tls-creds-x509 layout); clients use nbds://', command: '<%= config.bin %> <%= command.id %> disk.img --bind 0.0.0.0 --tls-certificates /etc/pki/blkrep' },
    { description: 'Only let in the replica whose client certificate has this DN', command: "<%= config.bin %> <%= command.id %> disk.img --bind 0.0.0.0 --tls-certificates /etc/pki/blkrep --tls-authz 'C=GB,O=blkrep,CN=replica-a'" },
    { description: "TLS with a pre-shared key (psktool -u alice -p keys.psk); nbdinfo 'nbds://alice@host?tls-psk-file=keys.psk'", command: '<%= config.bin %> <%= command.id %> disk.img --bind 0.0.0.0 --tls-psk /etc/blkrep/keys.psk' },
    { description: 'Be the primary of a replication pair: every write also goes to the secondary, a checkpoint every 20 s', command: '<%= config.bin %> <%= command.id %> disk.img --socket /run/blkrep/nbd.sock --control /run/blkrep/ctl.sock --replicate-to nbd://backup-host:10809/disk --checkpoint-interval 20s' },
    { description: 'Be a secondary whose hidden disk is on tmpfs and never synced (a host crash then needs a full resync)', command: '<%= config.bin %> <%= command.id %> disk.img --secondary --control /run/blkrep/ctl.sock --port 10809 --hidden /dev/shm/disk.hidden.qcow2 --hidden-durability volatile' },
    { description: 'Be a secondary that, after a split brain, keeps the data of the side that changed more (its own diverged clusters are salvaged first)', command: '<%= config.bin %> <%= command.id %> disk.img --secondary --control /run/blkrep/ctl.sock --port 10809 --node-name east --after-split-brain discard-least-changes' },
    { description: 'Replicate asynchronously to a plain qemu-nbd (no checkpoints), with a 256 MiB queue', command: '<%= config.bin %> <%= command.id %> disk.img --control /run/blkrep/ctl.sock --replicate-to nbd+unix:///?socket=/run/qemu-nbd.sock --protocol async --queue 256M' },
    { description: 'Replicate asynchronously over a slow WAN link: writes never wait for it; a full queue degrades and resyncs by bitmap (DRBD pull-ahead)', command: '<%= config.bin %> <%= command.id %> disk.img --control /run/blkrep/ctl.sock --replicate-to nbd://dr-site:10809/disk --protocol async --on-congestion pull-ahead' },
    { description: 'Prometheus metrics on port 9101 and JSON log lines (for journald, Loki, jq)', command: '<%= config.bin %> <%= command.id %> disk.img --control disk --metrics 127.0.0.1:9101 --log-format json' },
    { description: 'A bitmap per export, one in a file of its own choosing', command: '<%= config.bin %> <%= command.id %> --export a=a.img --export b=/dev/vdb --bitmap a:b0 --bitmap b:b0=/var/lib/blkrep/vdb.b0.bitmap' },
  ];

  static override args = {
    image: Args.string({ description: 'image to serve as the default export (a path, or memory:SIZE)', required: false }),
  };

  static override flags = {
    config: Flags.string({ description: 'read flags from this YAML or JSON file (keys are the long flag names, "image" the image; see blkrep-config-check(1)); flags given on the command line win', helpValue: 'FILE' }),
    name: Flags.string({ description: 'export name for IMAGE', default: '' }),
    export: Flags.string({ char: 'e', description: 'serve IMAGE under NAME', helpValue: 'NAME=IMAGE', multiple: true }),
    description: Flags.string({ char: 'D', description: 'description of the export(s), shown by nbdinfo' }),
    socket: Flags.string({ char: 'k', description: 'listen on this Unix socket (mode 0600 whatever the umask)', helpValue: 'PATH' }),
    'socket-mode': Flags.string({ description: 'permission bits of the --socket file, in octal (e.g. 0660 to let the group connect) [default: 0600]', helpValue: 'MODE', dependsOn: ['socket'] }),
    port: Flags.integer({ char: 'p', description: `listen on this TCP port [default: ${DEFAULT_PORT}]`, min: 0, max: 65535 }),
    bind: Flags.string({ char: 'b', description: 'TCP address to bind', default: '127.0.0.1', helpValue: 'ADDR' }),
    'read-only': Flags.boolean({ char: 'r', description: 'refuse writes (exports are advertised read-only)', default: false }),
    shared: Flags.integer({ charAliases: ['s'], description: 'maximum simultaneous connections', default: 100, min: 1 }),
    'handshake-timeout': secondsFlag({ description: 'close connections that have not finished the handshake after this many seconds; when --shared is reached, a new connection takes the place of the oldest one still in the handshake', default: 10, helpValue: 'SECONDS' }),
    'max-buffer': sizeFlag({ description: 'memory all connections may hold for request payloads and unsent replies together (at least 32M); when it is used up, connections are not read until there is room, first come first served [default: 256M]', helpValue: 'SIZE' }),
    'stall-timeout': Flags.string({ description: 'disconnect a client that makes the server hold over 1 MiB (replies it does not read, a write payload it stopped sending) and makes no progress for this many seconds; 0: never', default: '60', helpValue: 'SECONDS' }),
    'min-block-size': sizeFlag({ description: 'minimum block size advertised to clients (a power of two up to 64K; e.g. 4K for 4Kn devices)', helpValue: 'SIZE' }),
    'pid-file': Flags.string({ description: 'write the process id here (mode 0600) once listening; removed at exit', helpValue: 'PATH' }),
    control: Flags.string({ description: 'control socket (JSON lines, mode 0600) for blkrep status and later commands: a PATH, or a NAME for RUNDIR/NAME.ctl (RUNDIR /run/blkrep for root, else $XDG_RUNTIME_DIR/blkrep; created mode 0700), which the live commands find without --control', helpValue: 'PATH|NAME' }),
    verbose: Flags.boolean({ char: 'v', description: 'log each connection to stderr', default: false }),
    bitmap: Flags.string({
      char: 'B',
      description: 'record writes in dirty bitmap NAME (file IMAGE.NAME.bitmap, or FILE) and offer it as qemu:dirty-bitmap:NAME; EXPORT: says whose with several exports',
      helpValue: '[EXPORT:]NAME[=FILE]',
      multiple: true,
      multipleNonGreedy: true,
    }),
    'bitmap-granularity': sizeFlag({ description: 'bytes per bit of bitmaps created at start (a power of two, 512 to 64M) [default: 64K]', helpValue: 'SIZE' }),
    filter: filterFlag('stack a filter on every export, between the clients and the export (error, delay; see blkrep-filters(7)); repeatable, the first outermost'),
    'auto-bitmaps': Flags.boolean({ description: 'load every bitmap file beside an image (IMAGE.*.bitmap); --no-auto-bitmaps loads only those given with --bitmap', default: true, allowNo: true }),
    ...heartbeatFlags,
    tls: Flags.string({
      description: 'off: no TLS; on: STARTTLS offered, clear text allowed; require: nothing but STARTTLS before TLS is up [default: require when --tls-certificates or --tls-psk is given, else off]',
      options: ['off', 'on', 'require'],
      helpValue: 'MODE',
    }),
    'tls-certificates': Flags.string({ description: 'x509 credentials: a directory with ca-cert.pem, server-cert.pem, server-key.pem (as qemu tls-creds-x509 dir=)', helpValue: 'DIR', exclusive: ['tls-psk'] }),
    'tls-psk': Flags.string({ description: "PSK credentials: psktool's file of username:hexkey lines", helpValue: 'FILE' }),
    'tls-verify-peer': Flags.boolean({ description: 'x509: clients must present a certificate signed by ca-cert.pem (implied by --tls-authz)', default: false }),
    'tls-authz': Flags.string({
      description: 'let in only these clients: a file (a path) of certificate DNs (C=GB,O=blkrep,CN=replica-a) or PSK user names, one per line, re-read when it changes; or a DN or user name itself; repeatable',
      helpValue: 'FILE|DN|USER',
      multiple: true,
      multipleNonGreedy: true,
    }),
    'replicate-to': Flags.string({ exclusive: ['secondary'], description: "be the primary of a replication pair: forward every write to this NBD URI, the secondary's replica export (blkrep serve-nbd --secondary, or a plain NBD server: then without checkpoints)", helpValue: 'URI' }),
    protocol: Flags.string({ description: 'with --replicate-to: sync (default: a write completes when both disks have it) or async (after the local write; forwarded in order through the queue)', options: ['sync', 'async'], helpValue: 'sync|async', dependsOn: ['replicate-to'] }),
    queue: sizeFlag({ description: 'with --protocol async: memory of the writes waiting to be forwarded (payloads and 512 bytes each); a write that does not fit waits or degrades, as --on-congestion says [default: 8M]', helpValue: 'SIZE', dependsOn: ['replicate-to'] }),
    'on-congestion': Flags.string({
      description:
        "with --protocol async, a write that does not fit in the --queue: block (default, DRBD's: it waits for room, the secondary stays UpToDate) or pull-ahead (replication degrades at once, the write completes, a resync by the peer bitmap follows)",
      options: ['block', 'pull-ahead'],
      helpValue: 'block|pull-ahead',
      dependsOn: ['replicate-to'],
    }),
    'congestion-timeout': secondsFlag({ description: 'with --on-congestion block: a write waiting for room while the secondary replies to nothing for this many seconds degrades replication (reason congestion-timeout) [default: 10]', helpValue: 'SECONDS', dependsOn: ['replicate-to'] }),
    'checkpoint-interval': durationFlag({ description: 'with --replicate-to: take a checkpoint this often (e.g. 20s; default: only by blkrep checkpoint)', helpValue: 'DURATION', dependsOn: ['replicate-to'] }),
    secondary: Flags.boolean({ description: "serve IMAGE as a replication pair's secondary: the replica export (copy-before-write into the hidden disk) for the primary that holds the pair link", default: false, exclusive: ['export', 'read-only'] }),
    hidden: Flags.string({ description: 'the secondary\'s hidden disk, a qcow2 overlay of IMAGE created if absent [default: IMAGE.hidden.qcow2]', helpValue: 'FILE', dependsOn: ['secondary'] }),
    active: Flags.string({ description: 'the secondary\'s active disk, a qcow2 overlay of the hidden disk created if absent [default: IMAGE.active.qcow2]', helpValue: 'FILE', dependsOn: ['secondary'] }),
    'view-export': Flags.string({ description: "serve the secondary's view (active over hidden over disk) under NAME", helpValue: 'NAME', dependsOn: ['secondary'] }),
    'view-read-only': Flags.boolean({ description: 'serve the view export read-only', dependsOn: ['view-export'] }),
    'hidden-durability': Flags.string({
      description:
        "with --secondary: strict (default, the safe one: each copy into the hidden disk is on stable storage before the disk is written) or volatile (never fdatasynced, as QEMU advises for a hidden disk on tmpfs: a process crash loses nothing, a host crash makes the secondary Inconsistent, not promotable, until a full resync from the primary)",
      options: ['strict', 'volatile'],
      helpValue: 'strict|volatile',
      dependsOn: ['secondary'],
    }),
    // operations (ops): metrics and the log's format
    metrics: Flags.string({ description: 'serve Prometheus metrics on GET /metrics at this address: HOST:PORT, [IPV6]:PORT, :PORT (127.0.0.1) or unix:PATH (mode as --socket-mode, 0600 by default)', helpValue: 'ADDR:PORT|unix:PATH' }),
    'log-format': Flags.string({ description: 'stderr log lines: text ("TIME LEVEL blkrep serve-nbd: MESSAGE", TIME in ISO 8601 UTC; under the journal "<P>blkrep serve-nbd: MESSAGE", journald stamps the time) or json (one object per line: time, level, pid, message)', options: ['text', 'json'], default: 'text', helpValue: 'text|json' }),
    'after-split-brain': Flags.string({
      description: "with --secondary: which side's data a split brain keeps (both disks written apart): disconnect (default: refuse and explain), discard-zero-changes, discard-least-changes, discard-younger-primary, discard-older-primary, discard-node=NAME; the losing disk's clusters are kept in a salvage overlay IMAGE.salvage-TIME.qcow2 first",
      helpValue: 'POLICY',
      dependsOn: ['secondary'],
    }),
    'state-dir': Flags.string({ description: 'where the pair files of a disk that is a block device go (DIR/dev-vdb.pair.json and so on; a file disk keeps them beside it) [default: $BLKREP_STATE_DIR, $STATE_DIRECTORY, /var/lib/blkrep]', helpValue: 'DIR' }),
    'node-name': Flags.string({ description: "this node's name in a replication pair, for --after-split-brain discard-node=NAME (kept in IMAGE.pair.json) [default: the host name]", helpValue: 'NAME' }),
    'accept-plain-primary': Flags.boolean({ description: 'serve the replica export without a pair link, for a plain NBD primary (QEMU, nbdcopy); checkpoints are then taken on the secondary', dependsOn: ['secondary'] }),
  };

  async run(): Promise<ListeningEvent | undefined> {
    // --config FILE: the file's keys are flags; those given here win (src/config/file.ts)
    const { argv } = await applyConfig(this.argv, ServeNbd as unknown as CommandShape);
    const { args, flags } = await this.parse(ServeNbd, argv);
    const filters = parseFilters(flags.filter);
    const onOverlay = filters.find((f) => f.at === 'active' || f.at === 'hidden');
    if (onOverlay && !flags.secondary) this.usageError(`--filter ${onOverlay.spec}: at=${onOverlay.at} is the ${onOverlay.at} disk of a secondary: it needs --secondary`);
    const exports = this.exportSpecs(args.image, flags.name, flags.export ?? [], flags.description);
    this.bitmapSpecs(exports, flags.bitmap ?? []);
    const bg = flags['bitmap-granularity'];
    if (bg !== undefined && (bg < 512 || bg > 64 * 1024 * 1024 || (bg & (bg - 1)) !== 0)) {
      this.usageError(`--bitmap-granularity ${bg} is not a power of two between 512 and 64M`);
    }
    const socketMode = flags['socket-mode'] === undefined ? undefined : parseMode(flags['socket-mode'], (m) => this.usageError(m));
    const listen: ListenSpec[] = [];
    if (flags.socket) {
      await ensureRunDirFor(flags.socket);
      listen.push({ transport: 'unix', address: flags.socket });
    }
    if (!flags.socket || flags.port !== undefined) {
      const host = flags.bind.includes(':') && !flags.bind.startsWith('[') ? `[${flags.bind}]` : flags.bind;
      listen.push({ transport: 'tcp', address: `${host}:${flags.port ?? DEFAULT_PORT}` });
    }
    const mbs = flags['min-block-size'];
    if (mbs !== undefined && (mbs < 1 || mbs > 65536 || (mbs & (mbs - 1)) !== 0)) {
      this.usageError(`--min-block-size ${mbs} is not a power of two between 1 and 65536`);
    }
    const maxBuffer = flags['max-buffer'] ?? DEFAULT_MAX_BUFFER;
    if (maxBuffer < MAX_PAYLOAD) this.usageError(`--max-buffer ${formatSize(maxBuffer)} is below ${formatSize(MAX_PAYLOAD)}, the largest request a client may send`);
    const stall = Number(flags['stall-timeout']);
    if (flags['stall-timeout'].trim() === '' || !Number.isFinite(stall) || stall < 0) {
      this.usageError(`--stall-timeout "${flags['stall-timeout']}" is not a number of seconds (0 or more)`);
    }
    const heartbeat = await parseHeartbeatFlags(flags);
    const replicateTo = flags['replicate-to'];
    if (replicateTo !== undefined) {
      parseNbdUri(replicateTo);
      if (exports.length !== 1) this.usageError(`--replicate-to replicates one export; this daemon serves ${exports.length} (use blkrep replicate --export NAME for the others)`);
    }
    if (flags.queue !== undefined && flags.queue < 1024 * 1024) this.usageError(`--queue ${formatSize(flags.queue)} is below 1M`);
    const congestionFlag = flags['on-congestion'] !== undefined ? `--on-congestion ${flags['on-congestion']}` : flags['congestion-timeout'] !== undefined ? '--congestion-timeout' : undefined;
    if (congestionFlag && (flags.protocol ?? 'sync') === 'sync') this.usageError(`${congestionFlag} needs --protocol async: a sync primary has no queue (every write waits for the secondary)`);
    if (flags['congestion-timeout'] !== undefined && flags['on-congestion'] === 'pull-ahead') this.usageError('--congestion-timeout is for --on-congestion block: pull-ahead never waits');
    if (flags['congestion-timeout'] !== undefined && flags['congestion-timeout'] < 0.1) this.usageError(`--congestion-timeout ${flags['congestion-timeout']} is below 0.1 seconds`);
    const json = this.jsonEnabled();
    const log = daemonLogger(flags['log-format'] as LogFormat, flags.verbose);
    const metrics = flags.metrics === undefined ? undefined : parseMetricsAddress(flags.metrics);

    const controlPath = flags.control === undefined ? undefined : await prepareControlPath(flags.control);
    const registries = await loadRegistries(this);
    const tls = await this.tlsOptions(flags, registries.upgraders, log);
    if (flags.secondary && flags['view-export'] !== undefined && flags['view-export'] === exports[0]!.name) {
      this.usageError(`--view-export "${flags['view-export']}" is the replica export's name too (--name); give them different names`);
    }
    let afterSplitBrain: AfterSb0Policy | undefined;
    try {
      if (flags['after-split-brain'] !== undefined) afterSplitBrain = parseAfterSb0(flags['after-split-brain']);
    } catch (err) {
      this.usageError(`--after-split-brain: ${(err as Error).message}`);
    }
    // oclif's dependsOn counts --secondary's default (false) as given
    if (!flags.secondary) {
      const only = (['hidden', 'active', 'view-export', 'hidden-durability', 'after-split-brain', 'accept-plain-primary'] as const).filter((f) => flags[f] !== undefined && flags[f] !== false);
      if (only.length > 0) this.usageError(`${only.map((f) => `--${f}`).join(', ')} ${only.length === 1 ? 'needs' : 'need'} --secondary`);
    }
    if (flags['node-name'] !== undefined && flags['node-name'].trim() === '') this.usageError('--node-name is empty');
    if (flags['state-dir'] !== undefined && flags['state-dir'].trim() === '') this.usageError('--state-dir is empty');
    setStateDir(flags['state-dir'] === undefined ? undefined : resolvePath(flags['state-dir']));
    const pair = flags.secondary
      ? [
          secondarySetup(exports[0]!.name, {
            ...(flags.hidden === undefined ? {} : { hidden: flags.hidden }),
            ...(flags.active === undefined ? {} : { active: flags.active }),
            ...(flags['view-export'] === undefined ? {} : { viewExport: flags['view-export'] }),
            viewReadOnly: flags['view-read-only'] === true,
            acceptPlainPrimary: flags['accept-plain-primary'] === true,
            ...(afterSplitBrain === undefined ? {} : { afterSplitBrain }),
            ...(flags['node-name'] === undefined ? {} : { nodeName: flags['node-name'] }),
            ...(flags['hidden-durability'] === undefined ? {} : { hiddenDurability: flags['hidden-durability'] as 'strict' | 'volatile' }),
            ...(filters.some((f) => f.at === 'active') ? { activeFilters: filters.filter((f) => f.at === 'active') } : {}),
            ...(filters.some((f) => f.at === 'hidden') ? { hiddenFilters: filters.filter((f) => f.at === 'hidden') } : {}),
          }),
        ]
      : undefined;
    const daemon = await Daemon.start({
      exports,
      ...(pair ? { pair } : {}),
      listen,
      transports: registries.transports,
      ...(heartbeat ? { heartbeat, heartbeats: registries.heartbeats } : {}),
      ...(tls ? { tls } : {}),
      readOnly: flags['read-only'],
      maxConnections: flags.shared,
      handshakeTimeoutMs: flags['handshake-timeout'] * 1000,
      maxBufferBytes: maxBuffer,
      stallTimeoutMs: stall * 1000,
      minimumBlockSize: mbs,
      pidFile: flags['pid-file'],
      ...(socketMode === undefined ? {} : { socketMode }),
      controlPath,
      log,
      autoBitmaps: flags['auto-bitmaps'],
      ...(bg === undefined ? {} : { bitmapGranularity: bg }),
      ...(filters.length > 0 ? { filters } : {}),
      ...(metrics ? { metrics } : {}),
      ...(replicateTo === undefined
        ? {}
        : {
            replication: {
              uri: replicateTo,
              protocol: (flags.protocol ?? 'sync') as 'sync' | 'async',
              ...(flags.queue === undefined ? {} : { queueBytes: flags.queue }),
              ...(flags['on-congestion'] === undefined ? {} : { onCongestion: flags['on-congestion'] as 'block' | 'pull-ahead' }),
              ...(flags['congestion-timeout'] === undefined ? {} : { congestionTimeoutMs: Math.round(flags['congestion-timeout'] * 1000) }),
              ...(flags['checkpoint-interval'] === undefined ? {} : { checkpointIntervalMs: flags['checkpoint-interval'] }),
              ...(flags['node-name'] === undefined ? {} : { nodeName: flags['node-name'] }),
            },
          }),
    });

    let signals = 0;
    const onSignal = (signal: NodeJS.Signals): void => {
      signals++;
      if (signals > 1) {
        log('warn', `${signal} again: exiting without waiting for requests in flight`);
        daemon.server.destroyAll();
        // "removed at exit" holds for this exit too: a stale pid file names a pid that may be reused
        if (flags['pid-file']) rmSync(flags['pid-file'], { force: true });
        process.exit(1);
      }
      log('info', `${signal}: finishing requests in flight, flushing, exiting`);
      void daemon.stop();
    };
    process.on('SIGTERM', onSignal);
    process.on('SIGINT', onSignal);
    // SIGHUP reloads (as systemd's ExecReload sends it): what can be re-read is, nothing stops.
    const onHangup = (): void => {
      log('info', 'SIGHUP: reloading');
      void daemon.reload().then(
        (what) => log('info', what.length ? `reloaded: ${what.join('; ')}` : 'reloaded (nothing to re-read)'),
        (err: Error) => log('warn', `reload failed, still serving as before: ${err.message}`),
      );
    };
    process.on('SIGHUP', onHangup);

    const listening = daemon.listening();
    // A bitmap that could not be loaded as it was stored is said on stderr, whatever the output.
    for (const b of listening.bitmaps ?? []) if (b.state !== 'clean') log('warn', describeLoad(b));
    if (json) {
      this.jsonLine(listening);
    } else {
      for (const e of daemon.server.listExports()) {
        const driver = daemon.imageDriver(e.name);
        const what = driver === 'memory' ? 'in-memory, sparse' : driver;
        this.log(`Serving ${e.node.description} (${formatSize(e.size)}, ${what}${e.readOnly ? ', read-only' : ''}) as export "${e.name}"`);
        for (const b of listening.bitmaps ?? []) {
          if (b.export !== e.name) continue;
          const where = b.file === null ? 'in memory' : b.file;
          this.log(`  dirty bitmap "${b.name}" (${where}, ${b.created ? 'created' : b.state}) as qemu:dirty-bitmap:${b.name}`);
        }
      }
      for (const uri of listening.uris) this.log(`  ${uri}`);
      // a secondary serves no export until a primary holds the pair link (and without --view-export)
      if (listening.uris.length > 0) this.log(`Try: nbdinfo '${listening.uris[0]}'`);
      else this.log('No export yet: the replica export appears when a primary connects');
      if (listening.metrics) this.log(`Metrics: ${listening.metrics}`);
      if (controlPath) this.log(`Control socket: ${controlPath} (blkrep status --control ${flags.control})`);
      this.log('Stop with Ctrl-C.');
    }
    // systemd's Type=notify (blkrep@.service): ready once clients can connect
    notifySystemd('READY=1', (m) => log('warn', m));

    await daemon.stopped;
    process.off('SIGTERM', onSignal);
    process.off('SIGINT', onSignal);
    process.off('SIGHUP', onHangup);
    if (json) this.jsonLine({ event: 'stopped', pid: process.pid });
    // The listening line was the result; nothing more for oclif to print.
    return undefined;
  }

  /** --bitmap [EXPORT:]NAME[=FILE] → the bitmaps of each export. */
  /** The --tls* flags as the daemon's TLS (undefined: off); credentials are checked here, before anything is opened. */
  private async tlsOptions(
    flags: { tls?: string; 'tls-certificates'?: string; 'tls-psk'?: string; 'tls-verify-peer': boolean; 'tls-authz'?: string[] },
    upgraders: UpgraderRegistry,
    log: (level: LogLevel, message: string) => void,
  ): Promise<DaemonTls | undefined> {
    const creds = flags['tls-certificates'] ?? flags['tls-psk'];
    const mode = (flags.tls ?? (creds === undefined ? 'off' : 'require')) as DaemonTls['mode'];
    if (creds === undefined) {
      if (mode !== 'off') this.usageError(`--tls ${mode} needs credentials: --tls-certificates DIR (x509) or --tls-psk FILE`);
      if (flags['tls-verify-peer'] || flags['tls-authz']) this.usageError('--tls-verify-peer and --tls-authz need --tls-certificates DIR or --tls-psk FILE');
      return undefined;
    }
    if (mode === 'off') this.usageError('--tls off and TLS credentials contradict each other: drop the credentials, or say --tls on|require');
    const settings: Record<string, string> = flags['tls-certificates'] !== undefined ? { 'tls-certificates': flags['tls-certificates'] } : { 'tls-psk-file': flags['tls-psk']! };
    if (flags['tls-verify-peer']) {
      if (flags['tls-psk'] !== undefined) this.usageError('--tls-verify-peer is for x509 client certificates; with --tls-psk every client proves the key already');
      settings['tls-verify-peer'] = 'true';
    }
    const entries: string[] = [];
    for (const value of flags['tls-authz'] ?? []) {
      // a path names the file; anything else (a DN, a PSK user name) is an entry itself
      if (value.includes('/') || existsSync(value)) {
        if (settings['tls-authz'] !== undefined) this.usageError(`--tls-authz: one allow-list file at most (${settings['tls-authz']} and ${value}); give further clients as entries or lines of the file`);
        if (!existsSync(value)) this.usageError(`--tls-authz ${value}: no such file`);
        settings['tls-authz'] = value;
      } else {
        entries.push(value);
      }
    }
    if (entries.length) settings['tls-authz-list'] = entries.join('\n');
    const upgrader = upgraders.get('tls');
    const checked = upgrader.check ? await upgrader.check('server', settings) : { kind: flags['tls-psk'] ? 'psk' : 'x509', warnings: [] };
    for (const w of checked.warnings) log('warn', `TLS: ${w}`);
    return { mode, upgrader, settings, kind: checked.kind, ...(checked.notAfter ? { notAfter: checked.notAfter } : {}), warnings: checked.warnings };
  }

  private bitmapSpecs(exports: ExportSpec[], specs: string[]): void {
    for (const spec of specs) {
      const eq = spec.indexOf('=');
      const left = eq < 0 ? spec : spec.slice(0, eq);
      const file = eq < 0 ? undefined : spec.slice(eq + 1);
      if (file === '') this.usageError(`--bitmap "${spec}" names no file after "="`);
      const colon = left.indexOf(':');
      let target = colon >= 0 ? exports.find((e) => e.name === left.slice(0, colon)) : undefined;
      let name = target ? left.slice(colon + 1) : left;
      if (!target) {
        if (exports.length > 1) {
          this.usageError(`--bitmap "${spec}": with several exports, say whose bitmap it is: EXPORT:NAME[=FILE] (exports: ${exports.map((e) => `"${e.name}"`).join(', ')})`);
        }
        target = exports[0]!;
        name = left;
      }
      if (name === '') this.usageError(`--bitmap "${spec}" names no bitmap`);
      (target.bitmaps ??= []).push({ name, ...(file === undefined ? {} : { file }) });
    }
  }

  private exportSpecs(image: string | undefined, name: string, pairs: string[], description: string | undefined): ExportSpec[] {
    const specs: ExportSpec[] = [];
    if (image !== undefined) specs.push({ name, image, description });
    for (const pair of pairs) {
      const eq = pair.indexOf('=');
      if (eq < 0) this.usageError(`--export "${pair}" is not NAME=IMAGE`);
      const spec: ExportSpec = { name: pair.slice(0, eq), image: pair.slice(eq + 1), description };
      if (!spec.image) this.usageError(`--export "${pair}" names no image`);
      if (specs.some((s) => s.name === spec.name)) this.usageError(`export "${spec.name}" is given twice`);
      if (Buffer.byteLength(spec.name) > 4096) this.usageError(`export name of ${Buffer.byteLength(spec.name)} bytes is longer than the protocol's 4096`);
      specs.push(spec);
    }
    if (specs.length === 0) specs.push({ name, image: DEFAULT_IMAGE, description: description ?? 'blkrep embedded default: 1 GiB sparse in-memory disk' });
    return specs;
  }
}

/** --socket-mode MODE: octal permission bits, at most 0777 (no setuid, setgid or sticky bit). */
export function parseMode(text: string, fail: (message: string) => never): number {
  if (!/^[0-7]{1,4}$/.test(text)) fail(`--socket-mode "${text}" is not an octal mode such as 0600 or 0660`);
  const mode = Number.parseInt(text, 8);
  if (mode > 0o777) fail(`--socket-mode ${text} sets the setuid, setgid or sticky bit; give permission bits only (at most 0777)`);
  if ((mode & 0o600) !== 0o600) fail(`--socket-mode ${text} does not let the daemon's own user connect (it needs 0600)`);
  return mode;
}

/** One line for stderr about a bitmap that did not load clean. */
export function describeLoad(b: BitmapLoad): string {
  const what = `dirty bitmap "${b.name}" of export "${b.export}" (${b.file ?? 'in memory'})`;
  if (b.state === 'recovered') {
    return `${what} was not closed cleanly (crash or kill): recovered from its activity log (${b.extentsReplayed ?? 0} extents replayed, ${b.pagesDistrusted ?? 0} pages distrusted); every region written since it was last cleared is dirty`;
  }
  return `${what} cannot be trusted (${b.reason ?? b.fault ?? 'unknown reason'}): loaded as ALL DIRTY, so the next copy is a full one`;
}
