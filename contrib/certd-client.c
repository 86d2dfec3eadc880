/*
 * certd-client: reference client for the certd socket protocol (docs/protocol.md, v1).
 *
 * It does what a VMM does on KVM_EXIT_SNP_REQ_CERTS:
 *   1. GET (vm id, guest buffer pages)  -> ret, npages, generation, lease id, table
 *   2. ret == 0: copy the table into the guest buffer (here: a zeroed buffer of npages
 *      pages, then written to a file), set kvm_run ret/npages, set immediate_exit,
 *      KVM_RUN ... -EINTR means the report is signed (here: --hold milliseconds)
 *   3. RELEASE (lease id) so certd drops its shared lock on the certificate blob.
 * and STATUS, which prints the daemon's JSON status document.
 *
 * Single file, libc only:  cc -O2 -Wall -Wextra -o certd-client certd-client.c
 *
 * Exit codes (same as `certctl fetch`): 0 ok, 2 usage, 3 ENOSPC (npages printed),
 * 75 EAGAIN or rate/lease limit, 77 refused by access control, 69 unavailable (or EIO),
 * 70 protocol error, 74 cannot write the output file.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <getopt.h>
#include <poll.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

/* ---- protocol constants (docs/protocol.md) ---------------------------------------- */
#define MAGIC "CRTD"
#define VERSION 1
#define HEADER_SIZE 16
#define MAX_FRAME 65536
#define MAX_VM_ID 64
#define PAGE_SIZE 4096

enum { T_GET = 0x01, T_RELEASE = 0x02, T_STATUS = 0x03,
       T_GET_REPLY = 0x81, T_RELEASE_REPLY = 0x82, T_STATUS_REPLY = 0x83, T_ERROR = 0xFF };
enum { RET_OK = 0, RET_EIO = 5, RET_EAGAIN = 11, RET_ENOSPC = 28 };
enum { E_ACCESS_DENIED = 16, E_RATE_LIMITED = 17, E_TOO_MANY_LEASES = 18,
       E_TOO_MANY_REQUESTS = 19, E_SHUTTING_DOWN = 32, E_IDLE_TIMEOUT = 33, E_INTERNAL = 34 };

enum { EX_OK_ = 0, EX_USAGE_ = 2, EX_NOSPACE = 3, EX_UNAVAIL = 69, EX_PROTO = 70,
       EX_IOERR_ = 74, EX_BUSY = 75, EX_NOPERM_ = 77 };

#define DEFAULT_SOCKET "/run/certd/certd.sock"

/* ---- little-endian helpers: no struct casts, so alignment and host order never matter */
static void put16(uint8_t *p, uint16_t v) { p[0] = (uint8_t)v; p[1] = (uint8_t)(v >> 8); }
static void put32(uint8_t *p, uint32_t v) { for (int i = 0; i < 4; i++) p[i] = (uint8_t)(v >> (8 * i)); }
static void put64(uint8_t *p, uint64_t v) { for (int i = 0; i < 8; i++) p[i] = (uint8_t)(v >> (8 * i)); }
static uint16_t get16(const uint8_t *p) { return (uint16_t)(p[0] | p[1] << 8); }
static uint32_t get32(const uint8_t *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}
static uint64_t get64(const uint8_t *p) { return (uint64_t)get32(p) | (uint64_t)get32(p + 4) << 32; }

struct frame {
    uint8_t type;
    uint32_t request_id;
    uint32_t length;
    uint8_t *payload; /* malloc'd, length bytes (+1 for a NUL so text payloads print) */
};

static const char *prog = "certd-client";
static int timeout_ms = 5000;

static void die_msg(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void die_msg(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "%s: ", prog);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
}

static long long now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Returns 0, or an exit code after printing why. */
static int connect_socket(const char *path, int *out) {
    struct sockaddr_un sa = { .sun_family = AF_UNIX };
    if (strlen(path) >= sizeof sa.sun_path) {
        die_msg("socket path too long (%zu bytes, at most %zu): %s", strlen(path),
                sizeof sa.sun_path - 1, path);
        return EX_USAGE_;
    }
    strcpy(sa.sun_path, path);
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        die_msg("socket: %s", strerror(errno));
        return EX_UNAVAIL;
    }
    if (connect(fd, (struct sockaddr *)&sa, sizeof sa) < 0) {
        int e = errno;
        close(fd);
        if (e == EACCES || e == EPERM) {
            die_msg("permission denied connecting to %s (socket mode/group)", path);
            return EX_NOPERM_;
        }
        if (e == ENOENT)
            die_msg("no certd socket at %s (is certd running?)", path);
        else
            die_msg("cannot connect to %s: %s", path, strerror(e));
        return EX_UNAVAIL;
    }
    *out = fd;
    return 0;
}

static int write_all(int fd, const uint8_t *buf, size_t len) {
    while (len) {
        ssize_t n = send(fd, buf, len, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EINTR) continue;
            die_msg("send to certd failed: %s", strerror(errno));
            return EX_UNAVAIL;
        }
        buf += n;
        len -= (size_t)n;
    }
    return 0;
}

/* Read exactly len bytes before the deadline. */
static int read_exact(int fd, uint8_t *buf, size_t len, long long deadline) {
    while (len) {
        long long left = deadline - now_ms();
        if (left <= 0) {
            die_msg("no answer from certd within %d ms", timeout_ms);
            return EX_UNAVAIL;
        }
        struct pollfd p = { .fd = fd, .events = POLLIN };
        int r = poll(&p, 1, (int)left);
        if (r < 0 && errno == EINTR) continue;
        if (r < 0) {
            die_msg("poll: %s", strerror(errno));
            return EX_UNAVAIL;
        }
        if (r == 0) continue; /* deadline check above */
        ssize_t n = recv(fd, buf, len, 0);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) {
            die_msg("connection to certd lost: %s", strerror(errno));
            return EX_UNAVAIL;
        }
        if (n == 0) {
            die_msg("certd closed the connection");
            return EX_UNAVAIL;
        }
        buf += n;
        len -= (size_t)n;
    }
    return 0;
}

/* Read one frame and validate its header. Caller frees f->payload. */
static int read_frame(int fd, struct frame *f, long long deadline) {
    uint8_t h[HEADER_SIZE];
    int rc = read_exact(fd, h, sizeof h, deadline);
    if (rc) return rc;
    if (memcmp(h, MAGIC, 4) != 0) {
        die_msg("protocol error: bad magic %02x%02x%02x%02x (not a certd frame)",
                h[0], h[1], h[2], h[3]);
        return EX_PROTO;
    }
    f->type = h[5];
    f->request_id = get32(h + 8);
    f->length = get32(h + 12);
    if (f->length > MAX_FRAME - HEADER_SIZE) {
        die_msg("protocol error: frame of %u bytes exceeds %d", f->length + HEADER_SIZE, MAX_FRAME);
        return EX_PROTO;
    }
    /* The payload is read even for a version/flags we reject, so the message is complete. */
    f->payload = malloc(f->length + 1);
    if (!f->payload) {
        die_msg("out of memory");
        return EX_PROTO;
    }
    rc = read_exact(fd, f->payload, f->length, deadline);
    if (rc) {
        free(f->payload);
        f->payload = NULL;
        return rc;
    }
    f->payload[f->length] = 0;
    if (h[4] != VERSION || get16(h + 6) != 0) {
        die_msg("protocol error: frame version %u flags %#x (this client speaks version %d)",
                h[4], get16(h + 6), VERSION);
        free(f->payload);
        f->payload = NULL;
        return EX_PROTO;
    }
    return 0;
}

/* An ERROR frame: print it and map its code to an exit code. */
static int handle_error(const struct frame *f) {
    if (f->length < 8 || f->length - 8 > 1024) {
        die_msg("protocol error: malformed ERROR frame (%u bytes)", f->length);
        return EX_PROTO;
    }
    uint16_t code = get16(f->payload);
    uint32_t arg = get32(f->payload + 4);
    int closing = f->payload[2] & 1;
    die_msg("certd answered ERROR %u (arg %u%s): %.*s", code, arg, closing ? ", closing" : "",
            (int)(f->length - 8), (const char *)f->payload + 8);
    switch (code) {
    case E_ACCESS_DENIED: return EX_NOPERM_;
    case E_RATE_LIMITED: case E_TOO_MANY_LEASES: case E_TOO_MANY_REQUESTS: return EX_BUSY;
    case E_SHUTTING_DOWN: case E_IDLE_TIMEOUT: case E_INTERNAL: return EX_UNAVAIL;
    default: return EX_PROTO;
    }
}

/* Send one request, then read frames until the answer to rid (or a connection-level
 * ERROR) arrives; frames for other request ids are skipped (none are in flight here). */
static int transact(int fd, const uint8_t *req, size_t len, uint32_t rid, uint8_t want,
                    struct frame *out) {
    int rc = write_all(fd, req, len);
    if (rc) return rc;
    long long deadline = now_ms() + timeout_ms;
    for (;;) {
        struct frame f;
        rc = read_frame(fd, &f, deadline);
        if (rc) return rc;
        if (f.type == T_ERROR && (f.request_id == rid || f.request_id == 0)) {
            rc = handle_error(&f);
            free(f.payload);
            return rc;
        }
        if (f.request_id != rid) {
            free(f.payload);
            continue;
        }
        if (f.type != want) {
            die_msg("protocol error: answer type %#x, expected %#x", f.type, want);
            free(f.payload);
            return EX_PROTO;
        }
        *out = f;
        return 0;
    }
}

static void put_header(uint8_t *h, uint8_t type, uint32_t rid, uint32_t len) {
    memcpy(h, MAGIC, 4);
    h[4] = VERSION;
    h[5] = type;
    put16(h + 6, 0);
    put32(h + 8, rid);
    put32(h + 12, len);
}

static int do_release(int fd, uint64_t lease, uint32_t rid) {
    uint8_t req[HEADER_SIZE + 8];
    put_header(req, T_RELEASE, rid, 8);
    put64(req + HEADER_SIZE, lease);
    struct frame f;
    int rc = transact(fd, req, sizeof req, rid, T_RELEASE_REPLY, &f);
    if (rc) return rc;
    if (f.length != 16) {
        die_msg("protocol error: RELEASE_REPLY of %u bytes, expected 16", f.length);
        free(f.payload);
        return EX_PROTO;
    }
    uint32_t result = get32(f.payload + 8);
    free(f.payload);
    static const char *names[] = { "released", "unknown", "expired" };
    printf("release=%s\n", result < 3 ? names[result] : "?");
    if (result == 2)
        die_msg("warning: lease %llu expired before RELEASE; certd no longer held the lock",
                (unsigned long long)lease);
    return 0;
}

static int write_file(const char *path, const uint8_t *buf, size_t len) {
    FILE *fp = fopen(path, "wb");
    if (!fp) {
        die_msg("cannot open %s: %s", path, strerror(errno));
        return EX_IOERR_;
    }
    size_t n = fwrite(buf, 1, len, fp);
    int err = n != len ? errno : 0;
    if (fclose(fp) != 0 && !err) err = errno; /* a full disk often shows only at close */
    if (n != len || err) {
        die_msg("cannot write %s: %s", path, strerror(err ? err : EIO));
        return EX_IOERR_;
    }
    return 0;
}

static int cmd_get(int fd, const char *vm, uint64_t npages, const char *out, long hold_ms,
                   uint32_t wait_ms) {
    size_t idlen = strlen(vm);
    uint8_t req[HEADER_SIZE + 16 + MAX_VM_ID];
    put_header(req, T_GET, 1, (uint32_t)(16 + idlen));
    put64(req + 16, npages);
    put32(req + 24, wait_ms);
    put16(req + 28, 0);
    put16(req + 30, (uint16_t)idlen);
    memcpy(req + 32, vm, idlen);

    struct frame f;
    int rc = transact(fd, req, 32 + idlen, 1, T_GET_REPLY, &f);
    if (rc) return rc;
    if (f.length < 40 || get32(f.payload + 32) != f.length - 40) {
        die_msg("protocol error: malformed GET_REPLY (%u bytes)", f.length);
        free(f.payload);
        return EX_PROTO;
    }
    uint32_t ret = get32(f.payload);
    uint64_t need = get64(f.payload + 8);
    uint64_t gen = get64(f.payload + 16);
    uint64_t lease = get64(f.payload + 24);
    uint32_t tlen = get32(f.payload + 32);
    const uint8_t *table = f.payload + 40;

    const char *name = ret == RET_OK ? "OK" : ret == RET_ENOSPC ? "ENOSPC"
                     : ret == RET_EAGAIN ? "EAGAIN" : ret == RET_EIO ? "EIO" : NULL;
    if (!name || (ret != RET_OK && (tlen || lease))) {
        /* KVM_RUN fails with EINVAL on any other ret: a VMM must never pass it through. */
        die_msg("protocol error: GET_REPLY ret %u with table %u lease %llu", ret, tlen,
                (unsigned long long)lease);
        free(f.payload);
        return EX_PROTO;
    }
    printf("ret=%u (%s) npages=%llu generation=%llu lease=%llu table_len=%u\n", ret, name,
           (unsigned long long)need, (unsigned long long)gen, (unsigned long long)lease, tlen);

    if (ret == RET_ENOSPC) {
        /* VMM: kvm_run->snp_req_certs.npages = need; ret = ENOSPC; KVM_RUN. */
        printf("buffer of %llu page(s) too small: %llu needed\n", (unsigned long long)npages,
               (unsigned long long)need);
        free(f.payload);
        return EX_NOSPACE;
    }
    if (ret == RET_EAGAIN) { free(f.payload); return EX_BUSY; }    /* guest retries in 2 s */
    if (ret == RET_EIO) { free(f.payload); return EX_UNAVAIL; }     /* fatal on certd's side */

    /* ret == 0. VMM: check the table fits, copy it to the guest buffer at gpa. */
    if ((uint64_t)tlen > npages * PAGE_SIZE) {
        die_msg("protocol error: table of %u bytes does not fit %llu page(s)", tlen,
                (unsigned long long)npages);
        free(f.payload);
        if (lease) do_release(fd, lease, 2);
        return EX_PROTO;
    }
    uint8_t *guest = calloc(npages ? npages : 1, PAGE_SIZE); /* the guest zero-fills it */
    rc = 0;
    if (!guest) {
        die_msg("out of memory for a %llu-page guest buffer", (unsigned long long)npages);
        rc = EX_PROTO;
    } else {
        memcpy(guest, table, tlen);
        if (out) rc = write_file(out, guest, tlen);
        free(guest);
    }
    free(f.payload);

    /* VMM: ret = 0, immediate_exit = 1, KVM_RUN returns -EINTR once the report is signed. */
    if (rc == 0 && hold_ms > 0) {
        struct timespec ts = { hold_ms / 1000, (hold_ms % 1000) * 1000000L };
        while (nanosleep(&ts, &ts) < 0 && errno == EINTR) {}
    }
    /* Always release, even if writing failed: never leave certd's lock held. */
    if (lease) {
        int r2 = do_release(fd, lease, 2);
        if (!rc) rc = r2;
    }
    return rc;
}

static int cmd_status(int fd) {
    uint8_t req[HEADER_SIZE];
    put_header(req, T_STATUS, 1, 0);
    struct frame f;
    int rc = transact(fd, req, sizeof req, 1, T_STATUS_REPLY, &f);
    if (rc) return rc;
    fwrite(f.payload, 1, f.length, stdout);
    putchar('\n');
    free(f.payload);
    return 0;
}

static void usage(FILE *to) {
    fprintf(to,
        "usage: %s [-s SOCKET] [-t TIMEOUT_MS] get VM_ID [-n NPAGES] [-o FILE] [-H HOLD_MS] [-w WAIT_MS]\n"
        "       %s [-s SOCKET] [-t TIMEOUT_MS] status\n"
        "\n"
        "Reference client for the certd socket protocol (docs/protocol.md).\n"
        "  get     act as a VMM: GET the certificate table for VM_ID, write it to FILE,\n"
        "          hold the lease HOLD_MS milliseconds (default 0), then RELEASE\n"
        "  status  print the daemon's JSON status document\n"
        "\n"
        "  -s SOCKET      certd socket (default " DEFAULT_SOCKET ")\n"
        "  -t TIMEOUT_MS  wait at most this long for each answer (default 5000)\n"
        "  -n NPAGES      guest buffer size in 4 KiB pages (default 4)\n"
        "  -w WAIT_MS     how long certd may wait for a valid table before EAGAIN (0: its default)\n"
        "  -h             this help\n"
        "\n"
        "exit codes: 0 ok, 2 usage, 3 ENOSPC, 69 unavailable/EIO, 70 protocol error,\n"
        "            74 output not written, 75 EAGAIN/busy, 77 refused\n",
        prog, prog);
}

static int parse_u64(const char *s, unsigned long long max, unsigned long long *out) {
    char *end;
    errno = 0;
    if (!*s || *s == '-') return -1;
    unsigned long long v = strtoull(s, &end, 10);
    if (errno || *end || v > max) return -1;
    *out = v;
    return 0;
}

int main(int argc, char **argv) {
    const char *sock = DEFAULT_SOCKET, *out = NULL;
    unsigned long long npages = 4, hold = 0, wait = 0, tmo = 5000;
    int c;
    /* '+' stops at the first non-option (the command); options after it are parsed again. */
    while ((c = getopt(argc, argv, "+s:t:h")) != -1) {
        switch (c) {
        case 's': sock = optarg; break;
        case 't':
            if (parse_u64(optarg, 3600000, &tmo) || tmo == 0) {
                die_msg("-t: not a timeout in ms: %s", optarg);
                return EX_USAGE_;
            }
            break;
        case 'h': usage(stdout); return EX_OK_;
        default: usage(stderr); return EX_USAGE_;
        }
    }
    timeout_ms = (int)tmo;
    if (optind >= argc) { usage(stderr); return EX_USAGE_; }
    const char *cmd = argv[optind++];
    const char *vm = NULL;
    if (strcmp(cmd, "get") == 0) {
        /* Parse the get options over argv from "get" on; GNU getopt permutes, so
         * options may come before or after VM_ID. */
        int sargc = argc - (optind - 1);
        char **sargv = argv + (optind - 1);
        optind = 0; /* glibc: 0 reinitialises the scanner for a new argv */
        while ((c = getopt(sargc, sargv, "n:o:H:w:h")) != -1) {
            switch (c) {
            case 'n':
                if (parse_u64(optarg, (1ULL << 40), &npages)) {
                    die_msg("-n: not a page count: %s", optarg);
                    return EX_USAGE_;
                }
                break;
            case 'o': out = optarg; break;
            case 'H':
                if (parse_u64(optarg, 3600000, &hold)) {
                    die_msg("-H: not a duration in ms: %s", optarg);
                    return EX_USAGE_;
                }
                break;
            case 'w':
                if (parse_u64(optarg, 0xFFFFFFFFULL, &wait)) {
                    die_msg("-w: not a duration in ms: %s", optarg);
                    return EX_USAGE_;
                }
                break;
            case 'h': usage(stdout); return EX_OK_;
            default: usage(stderr); return EX_USAGE_;
            }
        }
        if (optind >= sargc) { die_msg("get: VM_ID missing"); return EX_USAGE_; }
        vm = sargv[optind++];
        if (optind < sargc) {
            die_msg("unexpected argument '%s'", sargv[optind]);
            return EX_USAGE_;
        }
        size_t n = strlen(vm);
        if (n == 0 || n > MAX_VM_ID) {
            die_msg("VM_ID must be 1..%d bytes, not %zu", MAX_VM_ID, n);
            return EX_USAGE_;
        }
        for (size_t i = 0; i < n; i++)
            if ((unsigned char)vm[i] < 0x20 || (unsigned char)vm[i] > 0x7e) {
                die_msg("VM_ID byte %zu (0x%02x) is not printable ASCII", i, (unsigned char)vm[i]);
                return EX_USAGE_;
            }
    } else if (strcmp(cmd, "status") == 0) {
        if (optind < argc) {
            die_msg("unexpected argument '%s'", argv[optind]);
            return EX_USAGE_;
        }
    } else {
        die_msg("unknown command '%s' (expected get or status)", cmd);
        usage(stderr);
        return EX_USAGE_;
    }

    int fd, rc = connect_socket(sock, &fd);
    if (rc) return rc;
    rc = vm ? cmd_get(fd, vm, npages, out, (long)hold, (uint32_t)wait) : cmd_status(fd);
    close(fd); /* certd ends any lease this connection still holds */
    return rc;
}
