/*
 * certd-client: a command-line client for the certd socket, on the library in
 * certd-client.h (docs/protocol.md, v1).
 *
 *   get     what a VMM does on KVM_EXIT_SNP_REQ_CERTS: GET the table for a VM id into a
 *           guest buffer of NPAGES pages (here: written to a file), hold the lease while
 *           "the report is signed" (-H), then RELEASE
 *   status  print the daemon's JSON status document
 *
 * build:  cc -O2 -Wall -Wextra -o certd-client certd-client-cli.c certd-client.c
 *
 * Exit codes (same as `certctl fetch`): 0 ok, 2 usage, 3 ENOSPC (npages printed),
 * 75 EAGAIN or rate/lease limit, 77 refused by access control, 69 unavailable (or EIO),
 * 70 protocol error, 74 cannot write the output file.
 */
#define _GNU_SOURCE
#include "certd-client.h"

#include <errno.h>
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

enum { EX_OK_ = 0, EX_USAGE_ = 2, EX_NOSPACE = 3, EX_UNAVAIL = 69, EX_PROTO = 70,
       EX_IOERR_ = 74, EX_BUSY = 75, EX_NOPERM_ = 77 };

static const char *prog = "certd-client";

/* A failed library call: print why, map it to an exit code. */
static int failed(const certd_client *c, int rc) {
    fprintf(stderr, "%s: %s\n", prog, c->message);
    switch (rc) {
    case CERTD_E_USAGE: return EX_USAGE_;
    case CERTD_E_ACCESS: return EX_NOPERM_;
    case CERTD_E_CONNECT: case CERTD_E_TIMEOUT: case CERTD_E_IO: return EX_UNAVAIL;
    case CERTD_E_SERVER:
        switch (c->error_code) {
        case CERTD_ERR_ACCESS_DENIED: return EX_NOPERM_;
        case CERTD_ERR_RATE_LIMITED: case CERTD_ERR_TOO_MANY_LEASES:
        case CERTD_ERR_TOO_MANY_REQUESTS: return EX_BUSY;
        case CERTD_ERR_SHUTTING_DOWN: case CERTD_ERR_IDLE_TIMEOUT: case CERTD_ERR_INTERNAL:
            return EX_UNAVAIL;
        default: return EX_PROTO;
        }
    default: return EX_PROTO;
    }
}

static int write_file(const char *path, const uint8_t *buf, size_t len) {
    FILE *fp = fopen(path, "wb");
    if (!fp) {
        fprintf(stderr, "%s: cannot open %s: %s\n", prog, path, strerror(errno));
        return EX_IOERR_;
    }
    size_t n = fwrite(buf, 1, len, fp);
    int err = n != len ? errno : 0;
    if (fclose(fp) != 0 && !err) err = errno; /* a full disk often shows only at close */
    if (n != len || err) {
        fprintf(stderr, "%s: cannot write %s: %s\n", prog, path, strerror(err ? err : EIO));
        return EX_IOERR_;
    }
    return EX_OK_;
}

static int do_release(certd_client *c, uint64_t lease) {
    uint32_t result;
    int rc = certd_release(c, lease, &result);
    if (rc) return failed(c, rc);
    static const char *names[] = { "released", "unknown", "expired" };
    printf("release=%s\n", names[result]);
    if (result == CERTD_RELEASE_EXPIRED)
        fprintf(stderr, "%s: warning: lease %llu expired before RELEASE; certd no longer held "
                "the lock\n", prog, (unsigned long long)lease);
    return EX_OK_;
}

static int cmd_get(certd_client *c, const char *vm, uint64_t npages, const char *out,
                   long hold_ms, uint32_t wait_ms) {
    /* The guest's buffer: npages pages, zero-filled; a table never exceeds one frame, so
     * more than that is never written. */
    size_t len = npages < CERTD_MAX_FRAME / CERTD_PAGE_SIZE ? (size_t)npages * CERTD_PAGE_SIZE
                                                            : CERTD_MAX_FRAME;
    uint8_t *guest = calloc(len ? len : 1, 1);
    if (!guest) {
        fprintf(stderr, "%s: out of memory for the guest buffer\n", prog);
        return EX_PROTO;
    }
    struct certd_reply r;
    int rc = certd_get(c, vm, npages, wait_ms, guest, len, &r);
    if (rc) {
        free(guest);
        return failed(c, rc);
    }
    printf("ret=%u (%s) npages=%llu generation=%llu lease=%llu table_len=%u\n", r.ret,
           certd_ret_name(r.ret), (unsigned long long)r.npages,
           (unsigned long long)r.generation, (unsigned long long)r.lease_id, r.table_len);
    if (r.ret != CERTD_RET_OK) {
        free(guest);
        if (r.ret == CERTD_RET_ENOSPC) {
            /* VMM: kvm_run->snp_req_certs.npages = r.npages; ret = ENOSPC; KVM_RUN. */
            printf("buffer of %llu page(s) too small: %llu needed\n", (unsigned long long)npages,
                   (unsigned long long)r.npages);
            return EX_NOSPACE;
        }
        return r.ret == CERTD_RET_EAGAIN ? EX_BUSY : EX_UNAVAIL; /* EAGAIN: guest retries */
    }
    rc = out ? write_file(out, guest, r.table_len) : EX_OK_;
    free(guest);
    /* VMM: ret = 0, immediate_exit = 1, KVM_RUN returns -EINTR once the report is signed. */
    if (rc == EX_OK_ && hold_ms > 0) {
        struct timespec ts = { hold_ms / 1000, (hold_ms % 1000) * 1000000L };
        while (nanosleep(&ts, &ts) < 0 && errno == EINTR) {}
    }
    /* Always release, even if writing failed: never leave certd's lock held. */
    if (r.lease_id) {
        int r2 = do_release(c, r.lease_id);
        if (!rc) rc = r2;
    }
    return rc;
}

static int cmd_status(certd_client *c) {
    char *json;
    size_t len;
    int rc = certd_status(c, &json, &len);
    if (rc) return failed(c, rc);
    fwrite(json, 1, len, stdout);
    putchar('\n');
    free(json);
    return EX_OK_;
}

static void usage(FILE *to) {
    fprintf(to,
        "usage: %s [-s SOCKET] [-t TIMEOUT_MS] get VM_ID [-n NPAGES] [-o FILE] [-H HOLD_MS] [-w WAIT_MS]\n"
        "       %s [-s SOCKET] [-t TIMEOUT_MS] status\n"
        "\n"
        "Command-line client for the certd socket protocol (docs/protocol.md).\n"
        "  get     act as a VMM: GET the certificate table for VM_ID, write it to FILE,\n"
        "          hold the lease HOLD_MS milliseconds (default 0), then RELEASE\n"
        "  status  print the daemon's JSON status document\n"
        "\n"
        "  -s SOCKET      certd socket (default " CERTD_DEFAULT_SOCKET ")\n"
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
    const char *sock = CERTD_DEFAULT_SOCKET, *out = NULL;
    unsigned long long npages = 4, hold = 0, wait = 0, tmo = 5000;
    int c;
    /* '+' stops at the first non-option (the command); options after it are parsed again. */
    while ((c = getopt(argc, argv, "+s:t:h")) != -1) {
        switch (c) {
        case 's': sock = optarg; break;
        case 't':
            if (parse_u64(optarg, 3600000, &tmo) || tmo == 0) {
                fprintf(stderr, "%s: -t: not a timeout in ms: %s\n", prog, optarg);
                return EX_USAGE_;
            }
            break;
        case 'h': usage(stdout); return EX_OK_;
        default: usage(stderr); return EX_USAGE_;
        }
    }
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
                    fprintf(stderr, "%s: -n: not a page count: %s\n", prog, optarg);
                    return EX_USAGE_;
                }
                break;
            case 'o': out = optarg; break;
            case 'H':
                if (parse_u64(optarg, 3600000, &hold)) {
                    fprintf(stderr, "%s: -H: not a duration in ms: %s\n", prog, optarg);
                    return EX_USAGE_;
                }
                break;
            case 'w':
                if (parse_u64(optarg, 0xFFFFFFFFULL, &wait)) {
                    fprintf(stderr, "%s: -w: not a duration in ms: %s\n", prog, optarg);
                    return EX_USAGE_;
                }
                break;
            case 'h': usage(stdout); return EX_OK_;
            default: usage(stderr); return EX_USAGE_;
            }
        }
        if (optind >= sargc) {
            fprintf(stderr, "%s: get: VM_ID missing\n", prog);
            return EX_USAGE_;
        }
        vm = sargv[optind++];
        if (optind < sargc) {
            fprintf(stderr, "%s: unexpected argument '%s'\n", prog, sargv[optind]);
            return EX_USAGE_;
        }
        if (!certd_valid_vm_id(vm)) { /* refused before connecting */
            fprintf(stderr, "%s: VM_ID must be 1..%u printable ASCII bytes\n", prog,
                    CERTD_MAX_VM_ID);
            return EX_USAGE_;
        }
    } else if (strcmp(cmd, "status") == 0) {
        if (optind < argc) {
            fprintf(stderr, "%s: unexpected argument '%s'\n", prog, argv[optind]);
            return EX_USAGE_;
        }
    } else {
        fprintf(stderr, "%s: unknown command '%s' (expected get or status)\n", prog, cmd);
        usage(stderr);
        return EX_USAGE_;
    }

    certd_client client;
    int rc = certd_connect(&client, sock, (int)tmo);
    if (rc) return failed(&client, rc);
    rc = vm ? cmd_get(&client, vm, npages, out, (long)hold, (uint32_t)wait) : cmd_status(&client);
    certd_close(&client); /* certd ends any lease this connection still holds */
    return rc;
}
