/**
 * The job types the serve-nbd daemon offers: each file imported here calls registerJobType()
 * (src/jobs/daemon-jobs.ts) when loaded. To add a type, write its file and add one import line.
 */
import './live-mirror.js';
import './commit-daemon.js';
import './backup-daemon.js';
