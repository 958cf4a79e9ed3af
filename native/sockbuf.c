/*
 * sockbuf: a socket's send buffer size, which Node sets for UDP only.
 *
 *   setSendBuffer(fd, bytes)   setsockopt SO_SNDBUFFORCE (root, or CAP_NET_ADMIN: beyond the
 *                              net.core.wmem_max limit), else SO_SNDBUF (capped at wmem_max);
 *                              returns what getsockopt SO_SNDBUF says afterwards (the kernel
 *                              doubles the value asked for, for its bookkeeping). Synchronous.
 *                              Failures (ENOTSOCK, EBADF …) are Errors with `.code` and `.syscall`.
 *   getSendBuffer(fd)          getsockopt SO_SNDBUF, synchronous.
 *
 * The pair's data connection (src/pair/primary.ts) sends 1 MiB writes over a Unix socket whose
 * default send buffer (208 KiB here) takes a 1 MiB write in ~5 pieces: a write, an EAGAIN and a
 * wake-up of both sides each. A Unix stream socket's queued bytes are charged to the sender's
 * buffer, so the sender's size alone decides.
 */
#include <errno.h>
#include <sys/socket.h>
#include <node_api.h>

/* blkrep_native.c: an Error like Node's fs errors, with .code, .errno and .syscall */
napi_value blkrep_make_error(napi_env env, int err, const char *syscall);

static napi_value set_send_buffer(napi_env env, napi_callback_info info) {
  size_t argc = 2;
  napi_value argv[2];
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok) return NULL;
  double fd_d, bytes_d;
  if (argc < 2 || napi_get_value_double(env, argv[0], &fd_d) != napi_ok || napi_get_value_double(env, argv[1], &bytes_d) != napi_ok ||
      !(fd_d >= 0 && fd_d <= 2147483647.0) || fd_d != (double)(int)fd_d ||
      !(bytes_d >= 1 && bytes_d <= 1073741824.0) || bytes_d != (double)(int)bytes_d) {
    napi_throw_type_error(env, "ERR_INVALID_ARG_TYPE", "setSendBuffer(fd, bytes): fd must be an integer file descriptor, bytes an integer from 1 to 2^30");
    return NULL;
  }
  int fd = (int)fd_d, bytes = (int)bytes_d;
  if (setsockopt(fd, SOL_SOCKET, SO_SNDBUFFORCE, &bytes, sizeof bytes) != 0) {
    int err = errno;
    if (err != EPERM || setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &bytes, sizeof bytes) != 0) {
      if (err == EPERM) err = errno;
      napi_throw(env, blkrep_make_error(env, err, "setsockopt(SO_SNDBUF)"));
      return NULL;
    }
  }
  int got = 0;
  socklen_t len = sizeof got;
  if (getsockopt(fd, SOL_SOCKET, SO_SNDBUF, &got, &len) != 0) {
    napi_throw(env, blkrep_make_error(env, errno, "getsockopt(SO_SNDBUF)"));
    return NULL;
  }
  napi_value out;
  napi_create_int32(env, got, &out);
  return out;
}

static napi_value get_send_buffer(napi_env env, napi_callback_info info) {
  size_t argc = 1;
  napi_value argv[1];
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok) return NULL;
  double fd_d;
  if (argc < 1 || napi_get_value_double(env, argv[0], &fd_d) != napi_ok || !(fd_d >= 0 && fd_d <= 2147483647.0) || fd_d != (double)(int)fd_d) {
    napi_throw_type_error(env, "ERR_INVALID_ARG_TYPE", "getSendBuffer(fd): fd must be an integer file descriptor");
    return NULL;
  }
  int got = 0;
  socklen_t len = sizeof got;
  if (getsockopt((int)fd_d, SOL_SOCKET, SO_SNDBUF, &got, &len) != 0) {
    napi_throw(env, blkrep_make_error(env, errno, "getsockopt(SO_SNDBUF)"));
    return NULL;
  }
  napi_value out;
  napi_create_int32(env, got, &out);
  return out;
}

/* called from blkrep_native.c's init */
void blkrep_register_sockbuf(napi_env env, napi_value exports) {
  napi_value fn;
  if (napi_create_function(env, "setSendBuffer", NAPI_AUTO_LENGTH, set_send_buffer, NULL, &fn) == napi_ok) {
    napi_set_named_property(env, exports, "setSendBuffer", fn);
  }
  if (napi_create_function(env, "getSendBuffer", NAPI_AUTO_LENGTH, get_send_buffer, NULL, &fn) == napi_ok) {
    napi_set_named_property(env, exports, "getSendBuffer", fn);
  }
}
