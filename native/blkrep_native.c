/*
 * blkrep_native: the few system calls Node does not expose and the raw driver needs for sparse
 * files and block devices (DESIGN.md §4).
 *
 *   seekData(fd, offset) / seekHole(fd, offset)   lseek SEEK_DATA / SEEK_HOLE, synchronous;
 *                                                 the offset, or -1 for ENXIO (no data/hole there)
 *   punchHole(fd, offset, length)                 fallocate PUNCH_HOLE|KEEP_SIZE      → Promise<void>
 *   zeroRange(fd, offset, length)                 fallocate ZERO_RANGE|KEEP_SIZE      → Promise<void>
 *   allocate(fd, offset, length)                  fallocate KEEP_SIZE (mode 0)        → Promise<void>
 *   discard(fd, offset, length)                   ioctl BLKDISCARD                    → Promise<void>
 *   zeroOut(fd, offset, length)                   ioctl BLKZEROOUT                    → Promise<void>
 *   blockDeviceSize(fd)                           ioctl BLKGETSIZE64, else lseek END  → Promise<number>
 *   willNeed(fd, offset, length)                  posix_fadvise WILLNEED              → Promise<void>
 *   setLock(fd, start, length, type)              fcntl F_OFD_SETLK, synchronous; type 'read',
 *                                                 'write' or 'unlock'; EAGAIN when another open
 *                                                 file description holds a conflicting lock
 *   getLock(fd, start, length, type)              fcntl F_OFD_GETLK, synchronous: null when a
 *                                                 `type` lock could be set, else the first
 *                                                 conflicting lock {type, start, length, pid}
 *                                                 (pid -1 for an OFD lock: the kernel does not
 *                                                 say which process holds one)
 *   preadNowait(fd, buffer, bufOffset, length, position)
 *   pwriteNowait(fd, buffer, bufOffset, length, position)
 *                                                 preadv2/pwritev2 with RWF_NOWAIT, synchronous:
 *                                                 the bytes done (0 at EOF for a read); -1 when
 *                                                 the kernel would have to wait (EAGAIN: pages not
 *                                                 cached, writeback throttling, a lock); -2 when
 *                                                 it does not offer RWF_NOWAIT for this file
 *                                                 (EOPNOTSUPP — ext4's buffered writes —, ENOSYS,
 *                                                 EINVAL from an older kernel); other failures
 *                                                 throw. Never blocks: the raw driver tries it on
 *                                                 the event loop and goes to the thread pool on
 *                                                 -1, and stops trying on -2.
 *   spliceSend(sockFd, fileFd, position, length, header, lane)
 *                                                 a serve-nbd read reply without a copy through
 *                                                 user space, on the pool: file -> the worker's
 *                                                 pipe (read errors here, nothing sent), then
 *                                                 header and pipe -> socket, in the lane's order
 *                                                 (see the function)
 *   execv(path, argv)                             execv with the process's environment: replaces
 *                                                 the program, keeping the PID, stdio (fds 0-2,
 *                                                 which node marks close-on-exec at start) and
 *                                                 every other fd not close-on-exec; returns only
 *                                                 on failure (throws).
 *                                                 bin/run.js re-runs node with V8 flags that only
 *                                                 a command line can set (Node 20 has no
 *                                                 process.execve).
 *
 * The image locks (src/block/image-lock.ts) are open-file-description locks as QEMU takes them:
 * they belong to the fd's open file description, so they conflict with locks taken through any
 * other open() of the file — in this process too — and go away when that description is closed.
 *
 * The asynchronous ones run on the libuv thread pool (napi_create_async_work): fallocate and the
 * block ioctls can take a long time. Failures are Errors with `.code` = errno name ('EINVAL',
 * 'ENOTSUP' — EOPNOTSUPP is reported as ENOTSUP), `.errno` = -errno (as Node's fs errors) and
 * `.syscall`. A zero length is a successful no-op. Offsets and lengths are integers in
 * [0, 2^53]; anything else is a TypeError.
 *
 * The caller must keep the fd open until the returned promise settles.
 */
#include <node_api.h>

#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <unistd.h>

#ifdef __linux__
#include <linux/falloc.h>
#include <linux/fs.h>
#include <sys/ioctl.h>
#define BLKREP_HAVE_FALLOCATE 1
#else
#define BLKREP_HAVE_FALLOCATE 0
#endif

#define MAX_SAFE_INTEGER 9007199254740992.0 /* 2^53 */

/* ------------------------------------------------------------------------------------------ */
/* errors */

static const char *errno_name(int e) {
  switch (e) {
    case EPERM: return "EPERM";
    case ENOENT: return "ENOENT";
    case EINTR: return "EINTR";
    case EIO: return "EIO";
    case ENXIO: return "ENXIO";
    case EBADF: return "EBADF";
    case EAGAIN: return "EAGAIN";
    case ENOMEM: return "ENOMEM";
    case EACCES: return "EACCES";
    case EFAULT: return "EFAULT";
    case EBUSY: return "EBUSY";
    case EEXIST: return "EEXIST";
    case ENODEV: return "ENODEV";
    case ENOTDIR: return "ENOTDIR";
    case EISDIR: return "EISDIR";
    case EINVAL: return "EINVAL";
    case ENFILE: return "ENFILE";
    case EMFILE: return "EMFILE";
    case ENOTTY: return "ENOTTY";
    case ETXTBSY: return "ETXTBSY";
    case EFBIG: return "EFBIG";
    case ENOSPC: return "ENOSPC";
    case ESPIPE: return "ESPIPE";
    case EROFS: return "EROFS";
    case ENOSYS: return "ENOSYS";
    case EOVERFLOW: return "EOVERFLOW";
    case ENOTSUP: return "ENOTSUP";
#if defined(EOPNOTSUPP) && EOPNOTSUPP != ENOTSUP
    case EOPNOTSUPP: return "ENOTSUP";
#endif
    case EDQUOT: return "EDQUOT";
    case ESHUTDOWN: return "ESHUTDOWN";
    case ETIMEDOUT: return "ETIMEDOUT";
    case ECANCELED: return "ECANCELED";
    case EPIPE: return "EPIPE";
    case ECONNRESET: return "ECONNRESET";
    case ENOLCK: return "ENOLCK";
#ifdef ENOMEDIUM
    case ENOMEDIUM: return "ENOMEDIUM";
#endif
#ifdef EREMOTEIO
    case EREMOTEIO: return "EREMOTEIO";
#endif
    case ENOTSOCK: return "ENOTSOCK";
    case ENOPROTOOPT: return "ENOPROTOOPT";
    default: return "UNKNOWN";
  }
}

/* An Error like Node's fs errors: "EINVAL: invalid argument, fallocate(PUNCH_HOLE)". sockbuf.c uses it too. */
napi_value blkrep_make_error(napi_env env, int err, const char *syscall) {
  char message[256];
  const char *name = errno_name(err);
  snprintf(message, sizeof message, "%s: %s, %s", name, strerror(err), syscall);
  napi_value code, msg, error, value;
  napi_create_string_utf8(env, name, NAPI_AUTO_LENGTH, &code);
  napi_create_string_utf8(env, message, NAPI_AUTO_LENGTH, &msg);
  napi_create_error(env, code, msg, &error);
  napi_create_int32(env, -err, &value);
  napi_set_named_property(env, error, "errno", value);
  napi_create_string_utf8(env, syscall, NAPI_AUTO_LENGTH, &value);
  napi_set_named_property(env, error, "syscall", value);
  return error;
}

/* ------------------------------------------------------------------------------------------ */
/* arguments */

/* Fetch exactly `want` arguments; throws a TypeError and returns 0 when there are too few. */
static int get_args(napi_env env, napi_callback_info info, size_t want, napi_value *argv, const char *fn) {
  size_t argc = want;
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok) return 0;
  if (argc < want) {
    char message[128];
    snprintf(message, sizeof message, "%s expects %zu arguments, got %zu", fn, want, argc);
    napi_throw_type_error(env, "ERR_INVALID_ARG_TYPE", message);
    return 0;
  }
  return 1;
}

/* An integer in [0, max]; throws a TypeError otherwise. */
static int get_uint(napi_env env, napi_value v, double max, int64_t *out, const char *fn, const char *what) {
  double d;
  if (napi_get_value_double(env, v, &d) != napi_ok || !(d >= 0 && d <= max) || d != (double)(int64_t)d) {
    char message[160];
    snprintf(message, sizeof message, "%s: %s must be an integer between 0 and %.0f", fn, what, max);
    napi_throw_type_error(env, "ERR_INVALID_ARG_TYPE", message);
    return 0;
  }
  *out = (int64_t)d;
  return 1;
}

static int get_fd(napi_env env, napi_value v, int *fd, const char *fn) {
  int64_t value;
  if (!get_uint(env, v, 2147483647.0, &value, fn, "fd")) return 0;
  *fd = (int)value;
  return 1;
}

/* ------------------------------------------------------------------------------------------ */
/* lseek SEEK_DATA / SEEK_HOLE (synchronous) */

static napi_value do_seek(napi_env env, napi_callback_info info, int data, const char *fn) {
  napi_value argv[2], result;
  int fd;
  int64_t offset;
  if (!get_args(env, info, 2, argv, fn)) return NULL;
  if (!get_fd(env, argv[0], &fd, fn) || !get_uint(env, argv[1], MAX_SAFE_INTEGER, &offset, fn, "offset")) return NULL;
#if defined(SEEK_DATA) && defined(SEEK_HOLE)
  off_t r = lseek(fd, (off_t)offset, data ? SEEK_DATA : SEEK_HOLE);
  if (r < 0) {
    if (errno == ENXIO) {
      napi_create_int32(env, -1, &result);
      return result;
    }
    napi_throw(env, blkrep_make_error(env, errno, data ? "lseek(SEEK_DATA)" : "lseek(SEEK_HOLE)"));
    return NULL;
  }
  napi_create_int64(env, (int64_t)r, &result);
  return result;
#else
  napi_throw(env, blkrep_make_error(env, ENOTSUP, data ? "lseek(SEEK_DATA)" : "lseek(SEEK_HOLE)"));
  return NULL;
#endif
}

static napi_value seek_data(napi_env env, napi_callback_info info) { return do_seek(env, info, 1, "seekData"); }
static napi_value seek_hole(napi_env env, napi_callback_info info) { return do_seek(env, info, 0, "seekHole"); }

/* ------------------------------------------------------------------------------------------ */
/* preadv2 / pwritev2 with RWF_NOWAIT (synchronous, never blocking) */

#if defined(__linux__) && defined(RWF_NOWAIT)
#include <sys/uio.h>
#define BLKREP_HAVE_NOWAIT 1
#else
#define BLKREP_HAVE_NOWAIT 0
#endif

static napi_value do_nowait(napi_env env, napi_callback_info info, int write, const char *fn) {
  napi_value argv[5], result;
  int fd;
  int64_t buf_offset, length, position;
  void *data;
  size_t size;
  if (!get_args(env, info, 5, argv, fn)) return NULL;
  if (!get_fd(env, argv[0], &fd, fn)) return NULL;
  if (napi_get_buffer_info(env, argv[1], &data, &size) != napi_ok) {
    napi_throw_type_error(env, "ERR_INVALID_ARG_TYPE", "buffer must be a Buffer");
    return NULL;
  }
  if (!get_uint(env, argv[2], (double)size, &buf_offset, fn, "bufOffset") ||
      !get_uint(env, argv[3], (double)size, &length, fn, "length") ||
      !get_uint(env, argv[4], MAX_SAFE_INTEGER, &position, fn, "position")) return NULL;
  if (buf_offset + length > (int64_t)size) {
    napi_throw_range_error(env, "ERR_OUT_OF_RANGE", "bufOffset + length is past the end of the buffer");
    return NULL;
  }
#if BLKREP_HAVE_NOWAIT
  struct iovec iov = {(char *)data + buf_offset, (size_t)length};
  ssize_t r;
  do r = write ? pwritev2(fd, &iov, 1, (off_t)position, RWF_NOWAIT) : preadv2(fd, &iov, 1, (off_t)position, RWF_NOWAIT);
  while (r < 0 && errno == EINTR);
  if (r < 0) {
    int e = errno;
    if (e == EAGAIN || e == EOPNOTSUPP || e == ENOTSUP || e == ENOSYS || e == EINVAL) {
      napi_create_int32(env, e == EAGAIN ? -1 : -2, &result);
      return result;
    }
    napi_throw(env, blkrep_make_error(env, e, write ? "pwritev2(RWF_NOWAIT)" : "preadv2(RWF_NOWAIT)"));
    return NULL;
  }
  napi_create_int64(env, (int64_t)r, &result);
#else
  napi_create_int32(env, -2, &result);
#endif
  return result;
}

static napi_value pread_nowait(napi_env env, napi_callback_info info) { return do_nowait(env, info, 0, "preadNowait"); }
static napi_value pwrite_nowait(napi_env env, napi_callback_info info) { return do_nowait(env, info, 1, "pwriteNowait"); }

/* ------------------------------------------------------------------------------------------ */
/* asynchronous operations */

typedef enum { OP_PUNCH_HOLE, OP_ZERO_RANGE, OP_ALLOCATE, OP_DISCARD, OP_ZERO_OUT, OP_DEVICE_SIZE, OP_WILL_NEED } op_t;

typedef struct {
  napi_async_work work;
  napi_deferred deferred;
  op_t op;
  int fd;
  int64_t offset;
  int64_t length;
  int err;             /* errno of the failure, 0 on success */
  const char *syscall; /* what failed, for the message */
  uint64_t result;     /* OP_DEVICE_SIZE */
} job_t;

#if BLKREP_HAVE_FALLOCATE
static int fallocate_retry(int fd, int mode, int64_t offset, int64_t length) {
  int r;
  do r = fallocate(fd, mode, (off_t)offset, (off_t)length);
  while (r < 0 && errno == EINTR);
  return r < 0 ? errno : 0;
}

static int range_ioctl(int fd, unsigned long request, int64_t offset, int64_t length) {
  uint64_t range[2] = {(uint64_t)offset, (uint64_t)length};
  int r;
  do r = ioctl(fd, request, range);
  while (r < 0 && errno == EINTR);
  return r < 0 ? errno : 0;
}
#endif

static void execute(napi_env env, void *data) {
  job_t *job = data;
  if (job->op != OP_DEVICE_SIZE && job->length == 0) return;
#if BLKREP_HAVE_FALLOCATE
  switch (job->op) {
    case OP_PUNCH_HOLE:
      job->syscall = "fallocate(PUNCH_HOLE)";
      job->err = fallocate_retry(job->fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, job->offset, job->length);
      break;
    case OP_ZERO_RANGE:
      job->syscall = "fallocate(ZERO_RANGE)";
      job->err = fallocate_retry(job->fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, job->offset, job->length);
      break;
    case OP_ALLOCATE:
      job->syscall = "fallocate(KEEP_SIZE)";
      job->err = fallocate_retry(job->fd, FALLOC_FL_KEEP_SIZE, job->offset, job->length);
      break;
    case OP_DISCARD:
      job->syscall = "ioctl(BLKDISCARD)";
      job->err = range_ioctl(job->fd, BLKDISCARD, job->offset, job->length);
      break;
    case OP_ZERO_OUT:
      job->syscall = "ioctl(BLKZEROOUT)";
      job->err = range_ioctl(job->fd, BLKZEROOUT, job->offset, job->length);
      break;
    case OP_DEVICE_SIZE: {
      uint64_t size = 0;
      job->syscall = "ioctl(BLKGETSIZE64)";
      if (ioctl(job->fd, BLKGETSIZE64, &size) == 0) {
        job->result = size;
      } else {
        off_t end = lseek(job->fd, 0, SEEK_END);
        job->syscall = "lseek(SEEK_END)";
        if (end < 0) job->err = errno;
        else job->result = (uint64_t)end;
      }
      break;
    }
    case OP_WILL_NEED:
      job->syscall = "posix_fadvise(WILLNEED)";
      job->err = posix_fadvise(job->fd, (off_t)job->offset, (off_t)job->length, POSIX_FADV_WILLNEED);
      break;
  }
#else
  if (job->op == OP_DEVICE_SIZE) {
    off_t end = lseek(job->fd, 0, SEEK_END);
    job->syscall = "lseek(SEEK_END)";
    if (end < 0) job->err = errno;
    else job->result = (uint64_t)end;
  } else {
    job->syscall = "fallocate";
    job->err = ENOTSUP;
  }
#endif
}

static void complete(napi_env env, napi_status status, void *data) {
  job_t *job = data;
  napi_value value;
  if (status != napi_ok) {
    napi_value msg;
    napi_create_string_utf8(env, "blkrep_native: operation cancelled", NAPI_AUTO_LENGTH, &msg);
    napi_create_error(env, NULL, msg, &value);
    napi_reject_deferred(env, job->deferred, value);
  } else if (job->err != 0) {
    napi_reject_deferred(env, job->deferred, blkrep_make_error(env, job->err, job->syscall));
  } else {
    if (job->op == OP_DEVICE_SIZE) napi_create_double(env, (double)job->result, &value);
    else napi_get_undefined(env, &value);
    napi_resolve_deferred(env, job->deferred, value);
  }
  napi_delete_async_work(env, job->work);
  free(job);
}

static napi_value queue(napi_env env, napi_callback_info info, op_t op, const char *fn) {
  napi_value argv[3], promise, name;
  size_t want = op == OP_DEVICE_SIZE ? 1 : 3;
  int fd;
  int64_t offset = 0, length = 0;
  if (!get_args(env, info, want, argv, fn)) return NULL;
  if (!get_fd(env, argv[0], &fd, fn)) return NULL;
  if (want == 3) {
    if (!get_uint(env, argv[1], MAX_SAFE_INTEGER, &offset, fn, "offset")) return NULL;
    if (!get_uint(env, argv[2], MAX_SAFE_INTEGER - (double)offset, &length, fn, "length")) return NULL;
  }
  job_t *job = calloc(1, sizeof *job);
  if (job == NULL) {
    napi_throw_error(env, "ENOMEM", "blkrep_native: out of memory");
    return NULL;
  }
  job->op = op;
  job->fd = fd;
  job->offset = offset;
  job->length = length;
  napi_create_string_utf8(env, fn, NAPI_AUTO_LENGTH, &name);
  if (napi_create_promise(env, &job->deferred, &promise) != napi_ok ||
      napi_create_async_work(env, NULL, name, execute, complete, job, &job->work) != napi_ok) {
    free(job);
    napi_throw_error(env, NULL, "blkrep_native: cannot create async work");
    return NULL;
  }
  if (napi_queue_async_work(env, job->work) != napi_ok) {
    napi_delete_async_work(env, job->work);
    free(job);
    napi_throw_error(env, NULL, "blkrep_native: cannot queue async work");
    return NULL;
  }
  return promise;
}

static napi_value punch_hole(napi_env env, napi_callback_info info) { return queue(env, info, OP_PUNCH_HOLE, "punchHole"); }
static napi_value zero_range(napi_env env, napi_callback_info info) { return queue(env, info, OP_ZERO_RANGE, "zeroRange"); }
static napi_value allocate(napi_env env, napi_callback_info info) { return queue(env, info, OP_ALLOCATE, "allocate"); }
static napi_value discard(napi_env env, napi_callback_info info) { return queue(env, info, OP_DISCARD, "discard"); }
static napi_value zero_out(napi_env env, napi_callback_info info) { return queue(env, info, OP_ZERO_OUT, "zeroOut"); }
static napi_value device_size(napi_env env, napi_callback_info info) { return queue(env, info, OP_DEVICE_SIZE, "blockDeviceSize"); }
static napi_value will_need(napi_env env, napi_callback_info info) { return queue(env, info, OP_WILL_NEED, "willNeed"); }

/* ------------------------------------------------------------------------------------------ */
/* fcntl F_OFD_SETLK / F_OFD_GETLK (synchronous: neither waits) */

/* 'read' → F_RDLCK, 'write' → F_WRLCK, 'unlock' → F_UNLCK; throws a TypeError otherwise. */
static int get_lock_type(napi_env env, napi_value v, short *type, const char *fn) {
  char buf[8];
  size_t n = 0;
  if (napi_get_value_string_utf8(env, v, buf, sizeof buf, &n) == napi_ok) {
    if (strcmp(buf, "read") == 0) { *type = F_RDLCK; return 1; }
    if (strcmp(buf, "write") == 0) { *type = F_WRLCK; return 1; }
    if (strcmp(buf, "unlock") == 0) { *type = F_UNLCK; return 1; }
  }
  char message[128];
  snprintf(message, sizeof message, "%s: type must be 'read', 'write' or 'unlock'", fn);
  napi_throw_type_error(env, "ERR_INVALID_ARG_TYPE", message);
  return 0;
}

static int get_lock_args(napi_env env, napi_callback_info info, int *fd, struct flock *fl, const char *fn) {
  napi_value argv[4];
  int64_t start, length;
  short type;
  if (!get_args(env, info, 4, argv, fn)) return 0;
  if (!get_fd(env, argv[0], fd, fn) || !get_uint(env, argv[1], MAX_SAFE_INTEGER, &start, fn, "start") ||
      !get_uint(env, argv[2], MAX_SAFE_INTEGER - (double)start, &length, fn, "length") || !get_lock_type(env, argv[3], &type, fn)) {
    return 0;
  }
  memset(fl, 0, sizeof *fl);
  fl->l_type = type;
  fl->l_whence = SEEK_SET;
  fl->l_start = (off_t)start;
  fl->l_len = (off_t)length;
  fl->l_pid = 0; /* F_OFD_* require 0 */
  return 1;
}

static napi_value set_lock(napi_env env, napi_callback_info info) {
  int fd;
  struct flock fl;
  if (!get_lock_args(env, info, &fd, &fl, "setLock")) return NULL;
#ifdef F_OFD_SETLK
  int r;
  do r = fcntl(fd, F_OFD_SETLK, &fl);
  while (r < 0 && errno == EINTR);
  if (r < 0) {
    /* POSIX lets a conflict be EACCES or EAGAIN: report one */
    napi_throw(env, blkrep_make_error(env, errno == EACCES ? EAGAIN : errno, "fcntl(F_OFD_SETLK)"));
    return NULL;
  }
  napi_value result;
  napi_get_undefined(env, &result);
  return result;
#else
  napi_throw(env, blkrep_make_error(env, ENOTSUP, "fcntl(F_OFD_SETLK)"));
  return NULL;
#endif
}

static napi_value get_lock(napi_env env, napi_callback_info info) {
  int fd;
  struct flock fl;
  if (!get_lock_args(env, info, &fd, &fl, "getLock")) return NULL;
#ifdef F_OFD_GETLK
  int r;
  do r = fcntl(fd, F_OFD_GETLK, &fl);
  while (r < 0 && errno == EINTR);
  if (r < 0) {
    napi_throw(env, blkrep_make_error(env, errno, "fcntl(F_OFD_GETLK)"));
    return NULL;
  }
  napi_value result, value;
  if (fl.l_type == F_UNLCK) {
    napi_get_null(env, &result);
    return result;
  }
  napi_create_object(env, &result);
  napi_create_string_utf8(env, fl.l_type == F_WRLCK ? "write" : "read", NAPI_AUTO_LENGTH, &value);
  napi_set_named_property(env, result, "type", value);
  napi_create_double(env, (double)fl.l_start, &value);
  napi_set_named_property(env, result, "start", value);
  napi_create_double(env, (double)fl.l_len, &value);
  napi_set_named_property(env, result, "length", value);
  napi_create_int32(env, (int32_t)fl.l_pid, &value);
  napi_set_named_property(env, result, "pid", value);
  return result;
#else
  napi_throw(env, blkrep_make_error(env, ENOTSUP, "fcntl(F_OFD_GETLK)"));
  return NULL;
#endif
}

/* ------------------------------------------------------------------------------------------ */
/* execv (synchronous; returns only when it failed) */

/* A JS string as a malloc'ed C string, or NULL (with a TypeError thrown). */
static char *get_string(napi_env env, napi_value v, const char *fn, const char *what) {
  size_t len;
  char *s;
  if (napi_get_value_string_utf8(env, v, NULL, 0, &len) != napi_ok || (s = malloc(len + 1)) == NULL) {
    char message[128];
    snprintf(message, sizeof message, "%s: %s must be a string", fn, what);
    napi_throw_type_error(env, "ERR_INVALID_ARG_TYPE", message);
    return NULL;
  }
  napi_get_value_string_utf8(env, v, s, len + 1, &len);
  return s;
}

static napi_value exec_v(napi_env env, napi_callback_info info) {
  napi_value argv[2], item;
  uint32_t n = 0, i, got = 0;
  char *path, **args = NULL;
  int err = ENOMEM;
  if (!get_args(env, info, 2, argv, "execv")) return NULL;
  if ((path = get_string(env, argv[0], "execv", "path")) == NULL) return NULL;
  if (napi_get_array_length(env, argv[1], &n) != napi_ok || n == 0) {
    free(path);
    napi_throw_type_error(env, "ERR_INVALID_ARG_TYPE", "execv: argv must be a non-empty array of strings");
    return NULL;
  }
  if ((args = calloc((size_t)n + 1, sizeof *args)) != NULL) {
    for (got = 0; got < n; got++) {
      if (napi_get_element(env, argv[1], got, &item) != napi_ok || (args[got] = get_string(env, item, "execv", "argv[i]")) == NULL) break;
    }
    if (got == n) {
      for (int fd = 0; fd <= 2; fd++) {
        int flags = fcntl(fd, F_GETFD);
        if (flags >= 0 && (flags & FD_CLOEXEC)) fcntl(fd, F_SETFD, flags & ~FD_CLOEXEC);
      }
      execv(path, args);
      err = errno;
    }
  }
  for (i = 0; args && i < got; i++) free(args[i]);
  free(args);
  free(path);
  if (args && got < n) return NULL; /* a TypeError is pending */
  napi_throw(env, blkrep_make_error(env, err, "execv"));
  return NULL;
}

/* ------------------------------------------------------------------------------------------ */
/* pwriteBatch: several positional writes on one thread-pool job */

/*
 * Writes queued in one turn of the event loop go to one worker together: one wake-up of the pool
 * and one completion for all of them, where one job per write costs a futex wake of a worker and
 * an eventfd wake of the loop each (bench/serve-nbd: ~6 futex calls per 4 KiB write). Each item
 * is written whole (short writes and EINTR retried) and reports the bytes written or its error.
 */
typedef struct {
  const char *data;
  size_t length;
  int64_t position;
  int err;
  size_t done;
} batch_item_t;

typedef struct {
  napi_async_work work;
  napi_deferred deferred;
  napi_ref buffers; /* keeps the payloads alive until the job is done */
  int fd;
  uint32_t count;
  batch_item_t items[];
} batch_t;

static void batch_execute(napi_env env, void *data) {
  batch_t *b = data;
  for (uint32_t i = 0; i < b->count; i++) {
    batch_item_t *it = &b->items[i];
    while (it->done < it->length) {
      ssize_t r = pwrite(b->fd, it->data + it->done, it->length - it->done, (off_t)(it->position + (int64_t)it->done));
      if (r < 0) {
        if (errno == EINTR) continue;
        it->err = errno;
        break;
      }
      if (r == 0) break; /* no progress: reported as a short count */
      it->done += (size_t)r;
    }
  }
}

static void batch_complete(napi_env env, napi_status status, void *data) {
  batch_t *b = data;
  napi_value value;
  if (status != napi_ok) {
    napi_value msg;
    napi_create_string_utf8(env, "blkrep_native: operation cancelled", NAPI_AUTO_LENGTH, &msg);
    napi_create_error(env, NULL, msg, &value);
    napi_reject_deferred(env, b->deferred, value);
  } else {
    napi_create_array_with_length(env, b->count, &value);
    for (uint32_t i = 0; i < b->count; i++) {
      napi_value item;
      if (b->items[i].err != 0) item = blkrep_make_error(env, b->items[i].err, "pwrite");
      else napi_create_double(env, (double)b->items[i].done, &item);
      napi_set_element(env, value, i, item);
    }
    napi_resolve_deferred(env, b->deferred, value);
  }
  napi_delete_reference(env, b->buffers);
  napi_delete_async_work(env, b->work);
  free(b);
}

#define BATCH_MAX_ITEMS 1024

static napi_value pwrite_batch(napi_env env, napi_callback_info info) {
  const char *fn = "pwriteBatch";
  napi_value argv[3], promise, name;
  int fd;
  uint32_t count, npos;
  bool is_array;
  if (!get_args(env, info, 3, argv, fn)) return NULL;
  if (!get_fd(env, argv[0], &fd, fn)) return NULL;
  if (napi_is_array(env, argv[1], &is_array) != napi_ok || !is_array || napi_is_array(env, argv[2], &is_array) != napi_ok || !is_array) {
    napi_throw_type_error(env, "ERR_INVALID_ARG_TYPE", "pwriteBatch: buffers and positions must be arrays");
    return NULL;
  }
  napi_get_array_length(env, argv[1], &count);
  napi_get_array_length(env, argv[2], &npos);
  if (count != npos || count == 0 || count > BATCH_MAX_ITEMS) {
    napi_throw_range_error(env, "ERR_OUT_OF_RANGE", "pwriteBatch: buffers and positions must have the same length, 1 to 1024");
    return NULL;
  }
  batch_t *b = calloc(1, sizeof *b + count * sizeof(batch_item_t));
  if (b == NULL) {
    napi_throw_error(env, "ENOMEM", "blkrep_native: out of memory");
    return NULL;
  }
  b->fd = fd;
  b->count = count;
  for (uint32_t i = 0; i < count; i++) {
    napi_value buf, pos;
    void *p;
    size_t size;
    int64_t position;
    napi_get_element(env, argv[1], i, &buf);
    napi_get_element(env, argv[2], i, &pos);
    if (napi_get_buffer_info(env, buf, &p, &size) != napi_ok) {
      free(b);
      napi_throw_type_error(env, "ERR_INVALID_ARG_TYPE", "pwriteBatch: every buffer must be a Buffer");
      return NULL;
    }
    if (!get_uint(env, pos, MAX_SAFE_INTEGER - (double)size, &position, fn, "position")) {
      free(b);
      return NULL;
    }
    b->items[i].data = p;
    b->items[i].length = size;
    b->items[i].position = position;
  }
  napi_create_string_utf8(env, fn, NAPI_AUTO_LENGTH, &name);
  if (napi_create_reference(env, argv[1], 1, &b->buffers) != napi_ok) {
    free(b);
    napi_throw_error(env, NULL, "blkrep_native: cannot reference the buffers");
    return NULL;
  }
  if (napi_create_promise(env, &b->deferred, &promise) != napi_ok ||
      napi_create_async_work(env, NULL, name, batch_execute, batch_complete, b, &b->work) != napi_ok) {
    napi_delete_reference(env, b->buffers);
    free(b);
    napi_throw_error(env, NULL, "blkrep_native: cannot create async work");
    return NULL;
  }
  if (napi_queue_async_work(env, b->work) != napi_ok) {
    napi_delete_async_work(env, b->work);
    napi_delete_reference(env, b->buffers);
    free(b);
    napi_throw_error(env, NULL, "blkrep_native: cannot queue async work");
    return NULL;
  }
  return promise;
}

/* ------------------------------------------------------------------------------------------ */
/* spliceSend: a read reply straight from a file to a socket (serve-nbd, src/nbd/splice-send.ts) */

/*
 * spliceSend(sockFd, fileFd, position, length, header, lane) → Promise<0 | 1>, on a pool thread:
 *   1. splice the whole range from the file into this thread's pipe (page references, no copy);
 *      a read error here has sent nothing: the promise rejects with `.stage` = 'read';
 *      a short range (EOF: the file shrank) or one that does not fit the pipe resolves 1, nothing sent;
 *   2. wait for its turn on the socket: the calls on one lane send in the order they were made, so
 *      several replies of a connection fill their pipes at once and go out back to back, without a
 *      trip through the event loop between them;
 *   3. send the header, then splice the pipe into the socket, waiting with poll() while the socket is
 *      full; an error rejects with `.stage` = 'send' (the connection's stream is then torn: the
 *      caller closes it). 0: all sent.
 * `lane`: a connection's Buffer of 3 aligned Int32 (zeroed at first): [0] cancel (the caller sets
 * it non-zero at close: waits end within 100 ms, nothing more is sent), [1] the next call's turn
 * (taken at the call), [2] the turn being served (workers advance it, futex wake-ups).
 * The socket fd is dup()ed at the call, so the connection closing meanwhile never lets the worker
 * write into a reused descriptor; the caller keeps fileFd open until the promise settles.
 */
#include <linux/futex.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <time.h>

typedef struct {
  napi_async_work work;
  napi_deferred deferred;
  napi_ref lane_ref;
  int32_t *lane;
  int32_t turn;
  int sock;
  int fd;
  int64_t position;
  size_t length;
  char header[64];
  size_t header_length;
  int result; /* 0 sent, 1 fallback */
  int err;
  const char *stage;
} splice_job_t;

static void splice_send_pipe(splice_job_t *j);

static __thread int splice_pipe[2] = {-1, -1};
static __thread size_t splice_pipe_size = 0;

static void splice_pipe_drop(void) {
  if (splice_pipe[0] >= 0) close(splice_pipe[0]);
  if (splice_pipe[1] >= 0) close(splice_pipe[1]);
  splice_pipe[0] = splice_pipe[1] = -1;
  splice_pipe_size = 0;
}

static int splice_pipe_get(void) {
  if (splice_pipe[0] >= 0) return 1;
  if (pipe2(splice_pipe, O_CLOEXEC | O_NONBLOCK) < 0) return 0;
  int size = fcntl(splice_pipe[1], F_SETPIPE_SZ, 1 << 20);
  if (size < 0) size = fcntl(splice_pipe[1], F_GETPIPE_SZ);
  if (size <= 0) {
    splice_pipe_drop();
    return 0;
  }
  splice_pipe_size = (size_t)size;
  return 1;
}

/* wait until the socket takes more; 0 when cancelled or on a poll error (err set) */
static int splice_wait_writable(splice_job_t *j) {
  for (;;) {
    if (__atomic_load_n(&j->lane[0], __ATOMIC_RELAXED) != 0) {
      j->err = ECANCELED;
      return 0;
    }
    struct pollfd p = {.fd = j->sock, .events = POLLOUT};
    int r = poll(&p, 1, 100);
    if (r < 0 && errno != EINTR) {
      j->err = errno;
      return 0;
    }
    if (r > 0) return 1;
  }
}

/* wait until lane[2] is this job's turn; 0 when cancelled */
static int splice_wait_turn(splice_job_t *j) {
  for (;;) {
    if (__atomic_load_n(&j->lane[0], __ATOMIC_RELAXED) != 0) return 0;
    int32_t serving = __atomic_load_n(&j->lane[2], __ATOMIC_ACQUIRE);
    if (serving == j->turn) return 1;
    struct timespec t = {.tv_sec = 0, .tv_nsec = 100 * 1000 * 1000};
    syscall(SYS_futex, &j->lane[2], FUTEX_WAIT_PRIVATE, serving, &t, NULL, 0);
  }
}

static void splice_next_turn(splice_job_t *j) {
  __atomic_add_fetch(&j->lane[2], 1, __ATOMIC_RELEASE);
  syscall(SYS_futex, &j->lane[2], FUTEX_WAKE_PRIVATE, INT32_MAX, NULL, NULL, 0);
}

/* stage 1: the range into this thread's pipe; 0 sent nothing (result 1, or err with stage 'read') */
static int splice_fill(splice_job_t *j) {
  j->result = 1;
  if (!splice_pipe_get()) return 0;
  long page = sysconf(_SC_PAGESIZE);
  if (page <= 0) page = 4096;
  /* one pipe slot per page touched: a range that would fill the pipe falls back (the write end would wait) */
  size_t pages = (size_t)(((j->position % page) + (int64_t)j->length + page - 1) / page);
  if (pages * (size_t)page > splice_pipe_size) return 0;
  loff_t off = (loff_t)j->position;
  size_t in = 0;
  while (in < j->length) {
    ssize_t r = splice(j->fd, &off, splice_pipe[1], NULL, j->length - in, SPLICE_F_MOVE);
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) {
      if (r < 0) {
        j->err = errno;
        j->stage = "read";
      }
      splice_pipe_drop(); /* what it holds is not wanted */
      return 0;
    }
    in += (size_t)r;
  }
  j->result = 0;
  return 1;
}

static void splice_execute(napi_env env, void *data) {
  splice_job_t *j = data;
  int filled = splice_fill(j);
  if (!splice_wait_turn(j)) {
    /* the connection is closing: nothing more goes out */
    if (filled) splice_pipe_drop();
    j->err = ECANCELED;
    j->stage = "send";
    return;
  }
  if (filled) splice_send_pipe(j);
  splice_next_turn(j);
}

/* stage 3: header, then the pipe, into the socket */
static void splice_send_pipe(splice_job_t *j) {
  j->stage = "send";
  size_t sent = 0;
  while (sent < j->header_length) {
    ssize_t r = send(j->sock, j->header + sent, j->header_length - sent, MSG_MORE | MSG_NOSIGNAL);
    if (r < 0 && errno == EINTR) continue;
    if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
      if (!splice_wait_writable(j)) break;
      continue;
    }
    if (r < 0) {
      j->err = errno;
      break;
    }
    sent += (size_t)r;
  }
  size_t out = 0;
  while (j->err == 0 && out < j->length) {
    ssize_t r = splice(splice_pipe[0], NULL, j->sock, NULL, j->length - out, SPLICE_F_MOVE | SPLICE_F_NONBLOCK);
    if (r < 0 && errno == EINTR) continue;
    if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
      if (!splice_wait_writable(j)) break;
      continue;
    }
    if (r <= 0) {
      j->err = r < 0 ? errno : EPIPE;
      break;
    }
    out += (size_t)r;
  }
  if (j->err != 0) splice_pipe_drop();
}

static void splice_complete(napi_env env, napi_status status, void *data) {
  splice_job_t *j = data;
  napi_value value;
  close(j->sock);
  if (status != napi_ok || j->err != 0) {
    value = blkrep_make_error(env, status != napi_ok ? ECANCELED : j->err, "splice");
    napi_value stage;
    napi_create_string_utf8(env, j->stage, NAPI_AUTO_LENGTH, &stage);
    napi_set_named_property(env, value, "stage", stage);
    napi_reject_deferred(env, j->deferred, value);
  } else {
    napi_create_int32(env, j->result, &value);
    napi_resolve_deferred(env, j->deferred, value);
  }
  napi_delete_reference(env, j->lane_ref);
  napi_delete_async_work(env, j->work);
  free(j);
}

static napi_value splice_send(napi_env env, napi_callback_info info) {
  const char *fn = "spliceSend";
  napi_value argv[6], promise, name;
  int sock, fd;
  int64_t position, length;
  void *header, *lane;
  size_t header_length, lane_length;
  if (!get_args(env, info, 6, argv, fn)) return NULL;
  if (!get_fd(env, argv[0], &sock, fn) || !get_fd(env, argv[1], &fd, fn)) return NULL;
  if (!get_uint(env, argv[2], MAX_SAFE_INTEGER, &position, fn, "position")) return NULL;
  if (!get_uint(env, argv[3], (double)(1 << 30), &length, fn, "length")) return NULL;
  if (napi_get_buffer_info(env, argv[4], &header, &header_length) != napi_ok || header_length > 64 ||
      napi_get_buffer_info(env, argv[5], &lane, &lane_length) != napi_ok || lane_length < 12 || ((uintptr_t)lane & 3) != 0) {
    napi_throw_type_error(env, "ERR_INVALID_ARG_TYPE", "spliceSend: header must be a Buffer of at most 64 bytes, lane an aligned Buffer of at least 12");
    return NULL;
  }
  splice_job_t *j = calloc(1, sizeof *j);
  if (j == NULL) {
    napi_throw_error(env, "ENOMEM", "blkrep_native: out of memory");
    return NULL;
  }
  j->sock = fcntl(sock, F_DUPFD_CLOEXEC, 0);
  if (j->sock < 0) {
    int err = errno;
    free(j);
    napi_throw(env, blkrep_make_error(env, err, "fcntl(F_DUPFD_CLOEXEC)"));
    return NULL;
  }
  j->fd = fd;
  j->position = position;
  j->length = (size_t)length;
  memcpy(j->header, header, header_length);
  j->header_length = header_length;
  j->lane = (int32_t *)lane;
  j->stage = "read";
  napi_create_string_utf8(env, fn, NAPI_AUTO_LENGTH, &name);
  if (napi_create_reference(env, argv[5], 1, &j->lane_ref) != napi_ok) {
    close(j->sock);
    free(j);
    napi_throw_error(env, NULL, "blkrep_native: cannot reference the lane");
    return NULL;
  }
  /* the lane's next turn (only this thread takes turns; jobs are queued, and so start, in turn order) */
  j->turn = j->lane[1];
  j->lane[1] = j->turn + 1;
  if (napi_create_promise(env, &j->deferred, &promise) != napi_ok ||
      napi_create_async_work(env, NULL, name, splice_execute, splice_complete, j, &j->work) != napi_ok ||
      napi_queue_async_work(env, j->work) != napi_ok) {
    j->lane[1] = j->turn; /* no job took it */
    napi_delete_reference(env, j->lane_ref);
    close(j->sock);
    free(j);
    napi_throw_error(env, NULL, "blkrep_native: cannot queue async work");
    return NULL;
  }
  return promise;
}

/* ------------------------------------------------------------------------------------------ */

void blkrep_register_sockbuf(napi_env env, napi_value exports); /* sockbuf.c */

NAPI_MODULE_INIT() {
  napi_value has_fallocate;
  napi_get_boolean(env, BLKREP_HAVE_FALLOCATE, &has_fallocate);
  napi_property_descriptor props[] = {
    {"seekData", NULL, seek_data, NULL, NULL, NULL, napi_enumerable, NULL},
    {"seekHole", NULL, seek_hole, NULL, NULL, NULL, napi_enumerable, NULL},
    {"punchHole", NULL, punch_hole, NULL, NULL, NULL, napi_enumerable, NULL},
    {"zeroRange", NULL, zero_range, NULL, NULL, NULL, napi_enumerable, NULL},
    {"allocate", NULL, allocate, NULL, NULL, NULL, napi_enumerable, NULL},
    {"discard", NULL, discard, NULL, NULL, NULL, napi_enumerable, NULL},
    {"zeroOut", NULL, zero_out, NULL, NULL, NULL, napi_enumerable, NULL},
    {"blockDeviceSize", NULL, device_size, NULL, NULL, NULL, napi_enumerable, NULL},
    {"willNeed", NULL, will_need, NULL, NULL, NULL, napi_enumerable, NULL},
    {"setLock", NULL, set_lock, NULL, NULL, NULL, napi_enumerable, NULL},
    {"getLock", NULL, get_lock, NULL, NULL, NULL, napi_enumerable, NULL},
    {"preadNowait", NULL, pread_nowait, NULL, NULL, NULL, napi_enumerable, NULL},
    {"pwriteNowait", NULL, pwrite_nowait, NULL, NULL, NULL, napi_enumerable, NULL},
    {"pwriteBatch", NULL, pwrite_batch, NULL, NULL, NULL, napi_enumerable, NULL},
    {"spliceSend", NULL, splice_send, NULL, NULL, NULL, napi_enumerable, NULL},
    {"execv", NULL, exec_v, NULL, NULL, NULL, napi_enumerable, NULL},
    {"hasFallocate", NULL, NULL, NULL, NULL, has_fallocate, napi_enumerable, NULL},
  };
  if (napi_define_properties(env, exports, sizeof props / sizeof props[0], props) != napi_ok) return NULL;
  blkrep_register_sockbuf(env, exports);
  return exports;
}
