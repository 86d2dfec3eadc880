/*
 * certd-client.c: the certd socket protocol (docs/protocol.md, v1) as a small C library.
 * The interface and its use are in certd-client.h. libc only.
 *
 * Integers are little-endian on the wire and read byte by byte (no struct casts, so
 * alignment and host byte order never matter).
 */
#define _GNU_SOURCE
#include "certd-client.h"

#include <errno.h>
#include <poll.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#define MAGIC "CRTD"
#define VERSION 1
#define HEADER_SIZE 16u
#define MAX_ERROR_MESSAGE 1024u

enum { T_GET = 0x01, T_RELEASE = 0x02, T_STATUS = 0x03,
       T_GET_REPLY = 0x81, T_RELEASE_REPLY = 0x82, T_STATUS_REPLY = 0x83, T_ERROR = 0xFF };

static void put16(uint8_t *p, uint16_t v) { p[0] = (uint8_t)v; p[1] = (uint8_t)(v >> 8); }
static void put32(uint8_t *p, uint32_t v) { for (int i = 0; i < 4; i++) p[i] = (uint8_t)(v >> (8 * i)); }
static void put64(uint8_t *p, uint64_t v) { for (int i = 0; i < 8; i++) p[i] = (uint8_t)(v >> (8 * i)); }
static uint16_t get16(const uint8_t *p) { return (uint16_t)(p[0] | p[1] << 8); }
static uint32_t get32(const uint8_t *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}
static uint64_t get64(const uint8_t *p) { return (uint64_t)get32(p) | (uint64_t)get32(p + 4) << 32; }

static int fail(certd_client *c, int rc, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static int fail(certd_client *c, int rc, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(c->message, sizeof c->message, fmt, ap);
    va_end(ap);
    return rc;
}

static long long now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

int certd_connect(certd_client *c, const char *path, int timeout_ms) {
    memset(c, 0, sizeof *c);
    c->fd = -1;
    c->timeout_ms = timeout_ms > 0 ? timeout_ms : 1000;
    c->next_id = 1;
    struct sockaddr_un sa = { .sun_family = AF_UNIX };
    size_t n = strlen(path);
    if (n >= sizeof sa.sun_path || n >= sizeof c->path)
        return fail(c, CERTD_E_USAGE, "socket path too long (%zu bytes, at most %zu): %s", n,
                    sizeof sa.sun_path - 1, path);
    memcpy(sa.sun_path, path, n + 1);
    memcpy(c->path, path, n + 1);
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return fail(c, CERTD_E_CONNECT, "socket: %s", strerror(errno));
    if (connect(fd, (struct sockaddr *)&sa, sizeof sa) < 0) {
        int e = errno;
        close(fd);
        if (e == EACCES || e == EPERM)
            return fail(c, CERTD_E_ACCESS, "permission denied connecting to %s (socket mode/group)",
                        path);
        if (e == ENOENT)
            return fail(c, CERTD_E_CONNECT, "no certd socket at %s (is certd running?)", path);
        return fail(c, CERTD_E_CONNECT, "cannot connect to %s: %s", path, strerror(e));
    }
    c->fd = fd;
    return CERTD_OK;
}

void certd_close(certd_client *c) {
    if (c->fd >= 0)
        close(c->fd);
    c->fd = -1;
}

int certd_reconnect(certd_client *c) {
    char path[sizeof c->path];
    int timeout = c->timeout_ms;
    memcpy(path, c->path, sizeof path);
    certd_close(c);
    return certd_connect(c, path, timeout);
}

static uint32_t take_id(certd_client *c) {
    uint32_t id = c->next_id++;
    if (c->next_id == 0) c->next_id = 1; /* 0 is reserved for connection-level errors */
    return id;
}

static void put_header(uint8_t *h, uint8_t type, uint32_t rid, uint32_t len) {
    memcpy(h, MAGIC, 4);
    h[4] = VERSION;
    h[5] = type;
    put16(h + 6, 0);
    put32(h + 8, rid);
    put32(h + 12, len);
}

static int write_all(certd_client *c, const uint8_t *buf, size_t len) {
    if (c->fd < 0)
        return fail(c, CERTD_E_IO, "not connected to certd");
    while (len) {
        ssize_t n = send(c->fd, buf, len, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EINTR) continue;
            return fail(c, CERTD_E_IO, "send to certd failed: %s", strerror(errno));
        }
        buf += n;
        len -= (size_t)n;
    }
    return CERTD_OK;
}

/* Read exactly len bytes before the deadline. */
static int read_exact(certd_client *c, uint8_t *buf, size_t len, long long deadline) {
    while (len) {
        long long left = deadline - now_ms();
        if (left <= 0)
            return fail(c, CERTD_E_TIMEOUT, "no answer from certd within %d ms", c->timeout_ms);
        struct pollfd p = { .fd = c->fd, .events = POLLIN };
        int r = poll(&p, 1, (int)left);
        if (r < 0 && errno == EINTR) continue;
        if (r < 0) return fail(c, CERTD_E_IO, "poll: %s", strerror(errno));
        if (r == 0) continue; /* the deadline check above */
        ssize_t n = recv(c->fd, buf, len, 0);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) return fail(c, CERTD_E_IO, "connection to certd lost: %s", strerror(errno));
        if (n == 0) return fail(c, CERTD_E_IO, "certd closed the connection");
        buf += n;
        len -= (size_t)n;
    }
    return CERTD_OK;
}

struct frame {
    uint8_t type;
    uint32_t request_id;
    uint32_t length;
    uint8_t *payload; /* malloc'd, length + 1 bytes (a NUL, so text payloads print) */
};

/* One frame with a valid header. The caller frees f->payload. */
static int read_frame(certd_client *c, struct frame *f, long long deadline) {
    uint8_t h[HEADER_SIZE];
    int rc = read_exact(c, h, sizeof h, deadline);
    if (rc) return rc;
    if (memcmp(h, MAGIC, 4) != 0)
        return fail(c, CERTD_E_PROTOCOL,
                    "protocol error: bad magic %02x%02x%02x%02x (not a certd frame)",
                    h[0], h[1], h[2], h[3]);
    f->type = h[5];
    f->request_id = get32(h + 8);
    f->length = get32(h + 12);
    if (f->length > CERTD_MAX_FRAME - HEADER_SIZE)
        return fail(c, CERTD_E_PROTOCOL, "protocol error: frame of %u bytes exceeds %u",
                    f->length + HEADER_SIZE, CERTD_MAX_FRAME);
    /* The payload is read even for a version/flags we refuse, so the message is complete. */
    f->payload = malloc((size_t)f->length + 1);
    if (!f->payload) return fail(c, CERTD_E_NOMEM, "out of memory");
    rc = read_exact(c, f->payload, f->length, deadline);
    if (rc) {
        free(f->payload);
        f->payload = NULL;
        return rc;
    }
    f->payload[f->length] = 0;
    if (h[4] != VERSION || get16(h + 6) != 0) {
        free(f->payload);
        f->payload = NULL;
        return fail(c, CERTD_E_PROTOCOL,
                    "protocol error: frame version %u flags %#x (this client speaks version %d)",
                    h[4], get16(h + 6), VERSION);
    }
    return CERTD_OK;
}

static int server_error(certd_client *c, const struct frame *f) {
    if (f->length < 8 || f->length - 8 > MAX_ERROR_MESSAGE)
        return fail(c, CERTD_E_PROTOCOL, "protocol error: malformed ERROR frame (%u bytes)",
                    f->length);
    c->error_code = get16(f->payload);
    c->error_closing = f->payload[2] & 1;
    c->error_arg = get32(f->payload + 4);
    return fail(c, CERTD_E_SERVER, "certd answered ERROR %u (arg %u%s) %s: %.*s", c->error_code,
                c->error_arg, c->error_closing ? ", closing" : "",
                certd_error_name(c->error_code), (int)(f->length - 8),
                (const char *)f->payload + 8);
}

/* Send one request, then read frames until its answer (or a connection-level ERROR);
 * frames for other request ids are skipped (this client has one request in flight). */
static int transact(certd_client *c, const uint8_t *req, size_t len, uint32_t rid, uint8_t want,
                    struct frame *out) {
    c->error_code = 0;
    c->error_arg = 0;
    c->error_closing = 0;
    c->message[0] = 0;
    int rc = write_all(c, req, len);
    if (rc) return rc;
    long long deadline = now_ms() + c->timeout_ms;
    for (;;) {
        struct frame f;
        rc = read_frame(c, &f, deadline);
        if (rc) return rc;
        if (f.type == T_ERROR && (f.request_id == rid || f.request_id == 0)) {
            rc = server_error(c, &f);
            free(f.payload);
            return rc;
        }
        if (f.request_id != rid) {
            free(f.payload);
            continue;
        }
        if (f.type != want) {
            free(f.payload);
            return fail(c, CERTD_E_PROTOCOL, "protocol error: answer type %#x, expected %#x",
                        f.type, want);
        }
        *out = f;
        return CERTD_OK;
    }
}

int certd_release(certd_client *c, uint64_t lease_id, uint32_t *result) {
    uint8_t req[HEADER_SIZE + 8];
    uint32_t rid = take_id(c);
    put_header(req, T_RELEASE, rid, 8);
    put64(req + HEADER_SIZE, lease_id);
    struct frame f;
    int rc = transact(c, req, sizeof req, rid, T_RELEASE_REPLY, &f);
    if (rc) return rc;
    if (f.length != 16 || get64(f.payload) != lease_id || get32(f.payload + 8) > 2) {
        free(f.payload);
        return fail(c, CERTD_E_PROTOCOL, "protocol error: malformed RELEASE_REPLY (%u bytes)",
                    f.length);
    }
    if (result) *result = get32(f.payload + 8);
    free(f.payload);
    return CERTD_OK;
}

int certd_valid_vm_id(const char *vm_id) {
    size_t n = strlen(vm_id);
    if (n == 0 || n > CERTD_MAX_VM_ID) return 0;
    for (size_t i = 0; i < n; i++)
        if ((unsigned char)vm_id[i] < 0x20 || (unsigned char)vm_id[i] > 0x7e) return 0;
    return 1;
}

int certd_get(certd_client *c, const char *vm_id, uint64_t npages, uint32_t wait_ms,
              void *buf, size_t buf_len, struct certd_reply *out) {
    memset(out, 0, sizeof *out);
    if (!certd_valid_vm_id(vm_id))
        return fail(c, CERTD_E_USAGE, "VM id must be 1..%u bytes of printable ASCII",
                    CERTD_MAX_VM_ID);
    size_t idlen = strlen(vm_id);
    uint8_t req[HEADER_SIZE + 16 + CERTD_MAX_VM_ID];
    uint32_t rid = take_id(c);
    put_header(req, T_GET, rid, (uint32_t)(16 + idlen));
    put64(req + 16, npages);
    put32(req + 24, wait_ms);
    put16(req + 28, 0);
    put16(req + 30, (uint16_t)idlen);
    memcpy(req + 32, vm_id, idlen);

    struct frame f;
    int rc = transact(c, req, HEADER_SIZE + 16 + idlen, rid, T_GET_REPLY, &f);
    if (rc) return rc;
    if (f.length < 40 || get32(f.payload + 32) != f.length - 40) {
        free(f.payload);
        return fail(c, CERTD_E_PROTOCOL, "protocol error: malformed GET_REPLY (%u bytes)",
                    f.length);
    }
    out->ret = get32(f.payload);
    out->npages = get64(f.payload + 8);
    out->generation = get64(f.payload + 16);
    out->lease_id = get64(f.payload + 24);
    uint32_t tlen = get32(f.payload + 32);
    int known = out->ret == CERTD_RET_OK || out->ret == CERTD_RET_EIO
             || out->ret == CERTD_RET_EAGAIN || out->ret == CERTD_RET_ENOSPC;
    if (!known || (out->ret != CERTD_RET_OK && (tlen || out->lease_id))) {
        /* KVM_RUN fails with EINVAL on any other ret: never pass it through. */
        free(f.payload);
        rc = fail(c, CERTD_E_PROTOCOL, "protocol error: GET_REPLY ret %u with table %u lease %llu",
                  out->ret, tlen, (unsigned long long)out->lease_id);
        goto release_and_fail;
    }
    if (out->ret == CERTD_RET_OK) {
        /* In pages, not bytes: npages comes from the guest and npages * 4096 may wrap. */
        uint64_t need = ((uint64_t)tlen + CERTD_PAGE_SIZE - 1) / CERTD_PAGE_SIZE;
        if (need > npages || tlen > buf_len) {
            free(f.payload);
            rc = fail(c, CERTD_E_PROTOCOL,
                      "protocol error: table of %u bytes does not fit %llu page(s) / %zu bytes",
                      tlen, (unsigned long long)npages, buf_len);
            goto release_and_fail;
        }
        if (tlen) memcpy(buf, f.payload + 40, tlen);
        out->table_len = tlen;
    }
    free(f.payload);
    return CERTD_OK;

release_and_fail:
    if (out->lease_id) {
        char why[sizeof c->message];
        memcpy(why, c->message, sizeof why);
        certd_release(c, out->lease_id, NULL); /* never leave certd's lock held */
        memcpy(c->message, why, sizeof why);
    }
    return rc;
}

int certd_status(certd_client *c, char **json, size_t *len) {
    uint8_t req[HEADER_SIZE];
    uint32_t rid = take_id(c);
    put_header(req, T_STATUS, rid, 0);
    struct frame f;
    int rc = transact(c, req, sizeof req, rid, T_STATUS_REPLY, &f);
    if (rc) return rc;
    *json = (char *)f.payload; /* NUL-terminated by read_frame */
    if (len) *len = f.length;
    return CERTD_OK;
}

uint32_t certd_guest_ret(int rc, const struct certd_reply *r) {
    return rc == CERTD_OK && r ? r->ret : CERTD_RET_EAGAIN;
}

const char *certd_rc_name(int rc) {
    switch (rc) {
    case CERTD_OK: return "CERTD_OK";
    case CERTD_E_USAGE: return "CERTD_E_USAGE";
    case CERTD_E_CONNECT: return "CERTD_E_CONNECT";
    case CERTD_E_ACCESS: return "CERTD_E_ACCESS";
    case CERTD_E_TIMEOUT: return "CERTD_E_TIMEOUT";
    case CERTD_E_IO: return "CERTD_E_IO";
    case CERTD_E_PROTOCOL: return "CERTD_E_PROTOCOL";
    case CERTD_E_SERVER: return "CERTD_E_SERVER";
    case CERTD_E_NOMEM: return "CERTD_E_NOMEM";
    default: return "?";
    }
}

const char *certd_ret_name(uint32_t ret) {
    switch (ret) {
    case CERTD_RET_OK: return "OK";
    case CERTD_RET_EIO: return "EIO";
    case CERTD_RET_EAGAIN: return "EAGAIN";
    case CERTD_RET_ENOSPC: return "ENOSPC";
    default: return "?";
    }
}

const char *certd_error_name(uint16_t code) {
    switch (code) {
    case CERTD_ERR_BAD_MAGIC: return "BAD_MAGIC";
    case CERTD_ERR_FRAME_TOO_LARGE: return "FRAME_TOO_LARGE";
    case CERTD_ERR_TRUNCATED: return "TRUNCATED";
    case CERTD_ERR_UNSUPPORTED_VERSION: return "UNSUPPORTED_VERSION";
    case CERTD_ERR_UNKNOWN_TYPE: return "UNKNOWN_TYPE";
    case CERTD_ERR_BAD_FLAGS: return "BAD_FLAGS";
    case CERTD_ERR_BAD_PAYLOAD: return "BAD_PAYLOAD";
    case CERTD_ERR_BAD_VM_ID: return "BAD_VM_ID";
    case CERTD_ERR_BAD_REQUEST_ID: return "BAD_REQUEST_ID";
    case CERTD_ERR_ACCESS_DENIED: return "ACCESS_DENIED";
    case CERTD_ERR_RATE_LIMITED: return "RATE_LIMITED";
    case CERTD_ERR_TOO_MANY_LEASES: return "TOO_MANY_LEASES";
    case CERTD_ERR_TOO_MANY_REQUESTS: return "TOO_MANY_REQUESTS";
    case CERTD_ERR_SHUTTING_DOWN: return "SHUTTING_DOWN";
    case CERTD_ERR_IDLE_TIMEOUT: return "IDLE_TIMEOUT";
    case CERTD_ERR_INTERNAL: return "INTERNAL";
    default: return "UNKNOWN_CODE";
    }
}
