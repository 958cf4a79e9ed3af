/**
 * What blkrep setup writes, from the answers alone (no I/O): the serve-nbd config file of this
 * node, the systemd template unit, and the commands to run next. The same answers give the same
 * bytes, which is what makes a second run change nothing.
 */
import { join } from 'node:path';
import { stringify } from 'yaml';
import { nodeDn } from './credentials.js';

export type Role = 'primary' | 'secondary';
export type TlsKind = 'none' | 'psk' | 'x509';
export type HeartbeatKind = 'udp' | 'tcp' | 'none';

export interface SetupAnswers {
  /** the pair's name: NAME.yaml, blkrep@NAME, the control socket NAME and the export name */
  name: string;
  role: Role;
  disk: string;
  /** the peer's address (host name or IP) */
  peer: string;
  /** the secondary's NBD port (both sides say the same) */
  port: number;
  /** address the secondary listens on */
  listen: string;
  tls: TlsKind;
  heartbeat: HeartbeatKind;
  heartbeatPort: number;
  nodeId: string;
  peerId: string;
  /** primary: a checkpoint this often ("20s"; "" for none) */
  checkpointInterval: string;
  protocol: 'sync' | 'async';
  /** where NAME.yaml and NAME/ (keys, certificates) go */
  configDir: string;
  /** where blkrep@.service goes */
  unitDir: string;
  /** the command that runs blkrep (node and bin/run.js, or /usr/bin/blkrep) */
  blkrep: string[];
}

export interface PlannedFile {
  path: string;
  content: string;
  mode: number;
}

export function secretsDir(a: SetupAnswers): string {
  return join(a.configDir, a.name);
}

export function configPath(a: SetupAnswers): string {
  return join(a.configDir, `${a.name}.yaml`);
}

function hostPort(host: string, port: number): string {
  return host.includes(':') && !host.startsWith('[') ? `[${host}]:${port}` : `${host}:${port}`;
}

/** The URI the primary replicates to. */
export function replicaUri(a: SetupAnswers): string {
  const dir = secretsDir(a);
  const at = hostPort(a.peer, a.port);
  const name = encodeURIComponent(a.name);
  if (a.tls === 'x509') return `nbds://${at}/${name}?tls-certificates=${join(dir, 'tls')}&tls-hostname=${encodeURIComponent(a.peerId)}`;
  if (a.tls === 'psk') return `nbds://${encodeURIComponent(pskUser(a))}@${at}/${name}?tls-psk-file=${join(dir, 'keys.psk')}`;
  return `nbd://${at}/${name}`;
}

export function pskUser(a: SetupAnswers): string {
  return `blkrep-${a.name}`;
}

/** serve-nbd's flags for this node, as the config file's mapping (keys in a fixed order). */
export function configValues(a: SetupAnswers): Record<string, unknown> {
  const dir = secretsDir(a);
  const v: Record<string, unknown> = { image: a.disk, name: a.name, control: a.name };
  if (a.role === 'secondary') {
    Object.assign(v, { secondary: true, bind: a.listen, port: a.port });
    if (a.tls === 'x509') Object.assign(v, { 'tls-certificates': join(dir, 'tls'), 'tls-authz': [nodeDn(a.peerId)] });
    if (a.tls === 'psk') Object.assign(v, { 'tls-psk': join(dir, 'keys.psk') });
  } else {
    // local clients (the VM, nbdcopy) use the Unix socket; the pair link is outgoing
    Object.assign(v, { socket: `/run/blkrep/${a.name}.nbd`, 'replicate-to': replicaUri(a), protocol: a.protocol });
    if (a.checkpointInterval !== '') v['checkpoint-interval'] = a.checkpointInterval;
  }
  if (a.heartbeat !== 'none') {
    Object.assign(v, {
      heartbeat: [`${a.heartbeat}://${hostPort(a.peer, a.heartbeatPort)}?listen=${hostPort(a.listen === '' ? '0.0.0.0' : a.listen, a.heartbeatPort)}`],
      'node-id': a.nodeId,
      'peer-id': a.peerId,
      'heartbeat-key': join(dir, 'heartbeat.key'),
    });
  }
  return v;
}

export function configText(a: SetupAnswers): string {
  const head = `# blkrep serve-nbd --config ${configPath(a)}: the ${a.role} of pair "${a.name}" (peer ${a.peerId} at ${a.peer}).\n# Written by blkrep setup; keys are serve-nbd's long flags (blkrep-config-check(1)); check with: blkrep config check ${configPath(a)}\n`;
  return head + stringify(configValues(a), { lineWidth: 0 });
}

/**
 * The template unit: one instance per pair (blkrep@NAME reads NAME.yaml). Type=notify: serve-nbd
 * says READY=1 once it listens (systemd-notify, hence NotifyAccess=all). Reload is SIGHUP
 * (serve-nbd re-reads what it can and keeps serving). The hardening keeps what the daemon needs:
 * the disk (a block device, so no PrivateDevices), /run/blkrep, /var/lib/blkrep (StateDirectory=: the pair
 * state of a block device), the image's directory for bitmaps and a file disk's pair state, which ProtectSystem=full leaves writable (it makes /usr, /boot and /etc
 * read-only); ProtectHome=read-only refuses images under /home. No PrivateDevices, no
 * CapabilityBoundingSet: the disk is a device node the daemon opens as root.
 */
export function unitText(a: SetupAnswers): string {
  const exec = a.blkrep.join(' ');
  const conf = join(a.configDir, '%i.yaml');
  return `# blkrep@NAME.service: blkrep serve-nbd --config ${conf}
# Written by blkrep setup (blkrep-setup(1)). Enable one pair with: systemctl enable --now blkrep@NAME
[Unit]
Description=blkrep replication pair %i
Documentation=man:blkrep-serve-nbd(1) man:blkrep-setup(1)
Wants=network-online.target
After=network-online.target
ConditionPathExists=${conf}

[Service]
Type=notify
NotifyAccess=all
ExecStartPre=${exec} config check ${conf}
ExecStart=${exec} serve-nbd --config ${conf}
ExecReload=/bin/kill -HUP $MAINPID
# serve-nbd flushes every export and pauses its jobs on SIGTERM; a second signal exits at once
KillMode=mixed
TimeoutStopSec=90
Restart=on-failure
RestartSec=2s
RuntimeDirectory=blkrep
RuntimeDirectoryMode=0700
RuntimeDirectoryPreserve=yes
# the pair files of a block device (DISK.pair.json …) live here, not in /dev: $STATE_DIRECTORY
StateDirectory=blkrep
StateDirectoryMode=0700
UMask=0077
LimitNOFILE=65536
NoNewPrivileges=yes
ProtectSystem=full
ProtectHome=read-only
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
LockPersonality=yes
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6
SystemCallArchitectures=native
SyslogIdentifier=blkrep-%i

[Install]
WantedBy=multi-user.target
`;
}

/** The commands to run next on this node (and on the peer), exactly. */
export function nextCommands(a: SetupAnswers, peerCommand: string | undefined): string[] {
  const out: string[] = [];
  const dir = secretsDir(a);
  if (peerCommand !== undefined) {
    const copies: string[] = [];
    if (a.heartbeat !== 'none') copies.push(join(dir, 'heartbeat.key'));
    if (a.tls === 'psk') copies.push(join(dir, 'keys.psk'));
    if (copies.length > 0 || a.tls === 'x509') out.push(`ssh ${a.peer} install -d -m 0700 ${dir}`);
    for (const f of copies) out.push(`scp -p ${f} ${a.peer}:${f}`);
    if (a.tls === 'x509') out.push(`scp -rp ${join(dir, 'peer-tls')} ${a.peer}:${join(dir, 'tls')}`);
    out.push(`ssh ${a.peer} ${peerCommand}`);
  }
  out.push(`${a.blkrep.join(' ')} config check ${configPath(a)}`);
  out.push('systemctl daemon-reload');
  out.push(`systemctl enable --now blkrep@${a.name}`);
  out.push(`${a.blkrep.join(' ')} status --control ${a.name}`);
  return out;
}
