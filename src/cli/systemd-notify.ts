/**
 * Readiness for systemd (Type=notify): when NOTIFY_SOCKET is set, `systemd-notify --ready
 * --pid=PID` tells the service manager the daemon is listening (the unit says NotifyAccess=all,
 * as the message comes from a child). Node has no AF_UNIX datagram sockets, hence the helper; a
 * missing systemd-notify is said on stderr and changes nothing else (systemd then times the start out).
 */
import { spawn } from 'node:child_process';

export function notifySystemd(state: string, log: (message: string) => void): void {
  if (!process.env.NOTIFY_SOCKET) return;
  const child = spawn('systemd-notify', [`--pid=${process.pid}`, ...(state === 'READY=1' ? ['--ready'] : [state])], { stdio: 'ignore' });
  child.once('error', (err) => log(`cannot tell systemd ${state}: ${err.message}`));
  child.once('exit', (code) => {
    if (code !== 0) log(`systemd-notify ${state} exited ${code}`);
  });
}
