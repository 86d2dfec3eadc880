/*
 * certd-client.h: a small C library for the certd socket protocol (docs/protocol.md, v1).
 *
 * libc only, two files (certd-client.h, certd-client.c): copy them into a VMM. What a VMM
 * does on KVM_EXIT_SNP_REQ_CERTS with it (contrib/vmm-example.c is the whole flow):
 *
 *   certd_client c;                                   once per VMM (or per vCPU thread)
 *   certd_connect(&c, CERTD_DEFAULT_SOCKET, 1000);
 *   ...
 *   struct certd_reply r;                             per exit: vm id, guest buffer
 *   int rc = certd_get(&c, vm_id, npages, 0, guest_buf, npages * CERTD_PAGE_SIZE, &r);
 *   run->snp_req_certs.ret = certd_guest_ret(rc, &r); never EIO for a failed call
 *   if (rc == CERTD_OK && r.ret == CERTD_RET_ENOSPC) run->snp_req_certs.npages = r.npages;
 *   run->immediate_exit = 1; ioctl(vcpu, KVM_RUN) -> -EINTR: the report is signed
 *   if (rc == CERTD_OK && r.lease_id) certd_release(&c, r.lease_id, NULL);
 *
 * A certd_client is not thread-safe: use one per thread, or a lock around each call.
 * Every call is bounded by the client's timeout. After a failed call (rc < 0) other than
 * CERTD_E_USAGE, reconnect before the next one (certd_reconnect): the stream may be out of
 * step, and leases of the old connection are gone with it.
 */
#ifndef CERTD_CLIENT_H
#define CERTD_CLIENT_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define CERTD_DEFAULT_SOCKET "/run/certd/certd.sock"
#define CERTD_PAGE_SIZE 4096u
#define CERTD_MAX_VM_ID 64u
#define CERTD_MAX_FRAME 65536u

/* GET_REPLY ret: exactly what KVM takes in kvm_run->snp_req_certs.ret (docs/protocol.md §6). */
enum {
    CERTD_RET_OK = 0,      /* the table is in the buffer */
    CERTD_RET_EIO = 5,     /* permanent failure on the host; the guest loses attestation */
    CERTD_RET_EAGAIN = 11, /* update in progress or no valid table yet; the guest retries in 2 s */
    CERTD_RET_ENOSPC = 28, /* buffer too small; reply npages is what the guest must offer */
};

/* RELEASE_REPLY result. None is an error for the VMM. */
enum { CERTD_RELEASED = 0, CERTD_RELEASE_UNKNOWN = 1, CERTD_RELEASE_EXPIRED = 2 };

/* ERROR codes the server sends (docs/protocol.md §5.1); unknown codes mean INTERNAL. */
enum {
    CERTD_ERR_BAD_MAGIC = 1, CERTD_ERR_FRAME_TOO_LARGE = 2, CERTD_ERR_TRUNCATED = 3,
    CERTD_ERR_UNSUPPORTED_VERSION = 4, CERTD_ERR_UNKNOWN_TYPE = 5, CERTD_ERR_BAD_FLAGS = 6,
    CERTD_ERR_BAD_PAYLOAD = 7, CERTD_ERR_BAD_VM_ID = 8, CERTD_ERR_BAD_REQUEST_ID = 9,
    CERTD_ERR_ACCESS_DENIED = 16, CERTD_ERR_RATE_LIMITED = 17, CERTD_ERR_TOO_MANY_LEASES = 18,
    CERTD_ERR_TOO_MANY_REQUESTS = 19, CERTD_ERR_SHUTTING_DOWN = 32, CERTD_ERR_IDLE_TIMEOUT = 33,
    CERTD_ERR_INTERNAL = 34,
};

/* Return codes of the library calls: 0 or negative. c->message says what happened. */
enum {
    CERTD_OK = 0,
    CERTD_E_USAGE = -1,    /* bad argument (VM id, socket path); nothing was sent */
    CERTD_E_CONNECT = -2,  /* cannot connect: no socket (ENOENT), ECONNREFUSED, ... */
    CERTD_E_ACCESS = -3,   /* EACCES on connect (socket mode/group) */
    CERTD_E_TIMEOUT = -4,  /* no complete answer within the timeout */
    CERTD_E_IO = -5,       /* send/recv failed or certd closed the connection */
    CERTD_E_PROTOCOL = -6, /* not a valid certd answer (bad magic, bad length, invariant) */
    CERTD_E_SERVER = -7,   /* certd answered ERROR: c->error_code, c->error_arg */
    CERTD_E_NOMEM = -8,
};

typedef struct certd_client {
    int fd;              /* -1 when not connected */
    int timeout_ms;      /* bound on each call's wait for its answer */
    uint32_t next_id;    /* request ids 1 .. 2^32-1 */
    char path[108];      /* for certd_reconnect */
    /* The last ERROR frame (rc CERTD_E_SERVER): */
    uint16_t error_code;
    uint32_t error_arg;  /* RATE_LIMITED: ms to wait; TOO_MANY_*: the limit */
    int error_closing;   /* the server closed the connection after it */
    char message[1200];  /* what the last failed call saw, for logs */
} certd_client;

struct certd_reply {
    uint32_t ret;        /* CERTD_RET_*; pass it to the guest (certd_guest_ret) */
    uint64_t npages;     /* pages the table needs; with ENOSPC: for kvm_run npages */
    uint64_t generation; /* of the blob served (0 with EAGAIN/EIO) */
    uint64_t lease_id;   /* non-zero: RELEASE it after the report is signed */
    uint32_t table_len;  /* bytes copied into the caller's buffer (ret OK only) */
};

/* Connect to certd's socket. timeout_ms > 0 bounds every later call on this client. */
int certd_connect(certd_client *c, const char *path, int timeout_ms);
/* Close and connect again to the same path (after a failed call). */
int certd_reconnect(certd_client *c);
/* Close the connection: certd ends every lease it still holds. Safe to call twice. */
void certd_close(certd_client *c);

/* GET for one KVM_EXIT_SNP_REQ_CERTS: vm_id (1..64 printable ASCII bytes), npages as the
 * guest offered (may be 0), wait_ms how long certd may wait for a valid table (0: its
 * default). With ret OK the table_len bytes of the table are copied to buf (the guest's
 * buffer at gpa, buf_len >= npages * 4096 bytes; the guest zero-filled it). The reply's
 * invariants are checked (docs/protocol.md §4.2); a reply that breaks them, or a table
 * longer than buf_len, is CERTD_E_PROTOCOL, after releasing any lease it carried. */
int certd_get(certd_client *c, const char *vm_id, uint64_t npages, uint32_t wait_ms,
              void *buf, size_t buf_len, struct certd_reply *out);

/* RELEASE a lease from a GET on this connection; *result (may be NULL) gets CERTD_RELEASED,
 * CERTD_RELEASE_UNKNOWN or CERTD_RELEASE_EXPIRED. */
int certd_release(certd_client *c, uint64_t lease_id, uint32_t *result);

/* STATUS: *json gets a malloc'd, NUL-terminated JSON document (free it); *len its length
 * (len may be NULL). For tools, not for VMMs. */
int certd_status(certd_client *c, char **json, size_t *len);

/* 1 if vm_id is a valid VM id (1..64 bytes of printable ASCII 0x20..0x7E), else 0. */
int certd_valid_vm_id(const char *vm_id);

/* What to answer the guest: r->ret after a successful certd_get, else EAGAIN. Never EIO
 * for a failed call: a Linux guest disables its attestation key on EIO until reboot, and
 * retries every 2 s on EAGAIN (docs/protocol.md §5). */
uint32_t certd_guest_ret(int rc, const struct certd_reply *r);

/* A name for a return code ("CERTD_E_TIMEOUT"), a ret ("EAGAIN"), or an ERROR code. */
const char *certd_rc_name(int rc);
const char *certd_ret_name(uint32_t ret);
const char *certd_error_name(uint16_t code);

#ifdef __cplusplus
}
#endif

#endif /* CERTD_CLIENT_H */
