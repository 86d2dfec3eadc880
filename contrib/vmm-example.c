/*
 * vmm-example: the VMM side of KVM_EXIT_SNP_REQ_CERTS with certd, on certd-client.h.
 *
 * Without a real vCPU: the guest and KVM_RUN are simulated, everything on certd's side is
 * real. A guest asks for its certificates with a buffer of GUEST_NPAGES pages; each
 * request is one exit, handled the way a VMM must (docs/protocol.md §6):
 *
 *   exit (vm id, gpa, npages)  ->  certd GET  ->  table copied into the guest buffer at gpa
 *   -> kvm_run ret (ENOSPC: npages too) -> immediate_exit = 1, KVM_RUN returns -EINTR once
 *   the firmware signed the report -> RELEASE the lease -> clear immediate_exit, resume.
 *
 * A failed call to certd (unreachable, timeout, ERROR) answers the guest EAGAIN, never EIO
 * (a Linux guest disables its attestation key on EIO). The guest retries ENOSPC at once
 * with the size it was told, and EAGAIN after RETRY_MS (a Linux guest waits 2 s).
 *
 * usage: vmm-example [-s SOCKET] [-t TIMEOUT_MS] [-g GUEST_NPAGES] [-o FILE] [-r RETRIES]
 *                    [-d RETRY_MS] [-W] [-R] VM_ID
 *   -o FILE  write the guest's whole buffer to FILE at the end
 *   -W       pause at each step a test wants to look at ("vmm: paused: ..." on stdout),
 *            until a line arrives on stdin
 *   -R       do not RELEASE (a negative control: certd then holds the lease until the
 *            connection closes or the lease times out)
 * Exit: 0 the guest has its table, 75 the guest was left with EAGAIN, 69 EIO, 2 usage,
 *       74 FILE not written.
 *
 * build: cc -O2 -Wall -Wextra -o vmm-example vmm-example.c certd-client.c
 */
#define _GNU_SOURCE
#include "certd-client.h"

#include <errno.h>
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* The kvm_run fields this exit uses. A real VMM reads and writes the vCPU's mmap'd
 * struct kvm_run from <linux/kvm.h> (the merged ABI: kvm_run.snp_req_certs is
 * {__u64 gpa; __u64 npages; __u64 ret;}; take KVM_EXIT_SNP_REQ_CERTS from the header, it
 * is not the same number in every tree), after enabling the exit per VM with
 * KVM_SEV_SNP_ENABLE_REQ_CERTS (KVM_MEMORY_ENCRYPT_OP; attribute KVM_X86_SEV_SNP_REQ_CERTS
 * says whether the kernel has it). */
struct sim_kvm_run {
    uint8_t immediate_exit;
    struct { uint64_t gpa; uint64_t npages; uint64_t ret; } snp_req_certs;
};

/* Guest memory: the guest's shared (unencrypted) buffer lives at GUEST_GPA. */
#define GUEST_GPA 0x100000ull
static uint8_t *guest_mem;
static uint64_t guest_mem_pages;

static void *gpa_to_hva(uint64_t gpa, uint64_t npages) {
    if (gpa != GUEST_GPA || npages > guest_mem_pages) return NULL; /* outside guest memory */
    return guest_mem;
}

static int pause_mode;
static void pause_at(const char *what) {
    if (!pause_mode) return;
    printf("vmm: paused: %s\n", what);
    fflush(stdout);
    char line[64];
    if (!fgets(line, sizeof line, stdin)) { /* EOF: carry on */ }
}

struct vmm {
    certd_client certd;
    int connected;
    const char *vm_id;
    int skip_release;
    uint64_t pending_lease; /* to RELEASE at the -EINTR that follows immediate_exit */
};

/* KVM_EXIT_SNP_REQ_CERTS: answer it from certd. */
static void handle_req_certs(struct vmm *v, struct sim_kvm_run *run) {
    uint64_t npages = run->snp_req_certs.npages;
    void *buf = gpa_to_hva(run->snp_req_certs.gpa, npages);
    struct certd_reply r;
    int rc = CERTD_E_CONNECT;
    if (!buf) {
        printf("vmm: gpa %#llx + %llu pages is not guest memory: EAGAIN\n",
               (unsigned long long)run->snp_req_certs.gpa, (unsigned long long)npages);
        memset(&r, 0, sizeof r);
    } else {
        if (!v->connected) rc = certd_reconnect(&v->certd);
        else rc = CERTD_OK;
        v->connected = rc == CERTD_OK;
        if (rc == CERTD_OK)
            rc = certd_get(&v->certd, v->vm_id, npages, 0, buf, npages * CERTD_PAGE_SIZE, &r);
        if (rc == CERTD_OK) {
            printf("certd: ret=%u (%s) npages=%llu generation=%llu lease=%llu table_len=%u\n",
                   r.ret, certd_ret_name(r.ret), (unsigned long long)r.npages,
                   (unsigned long long)r.generation, (unsigned long long)r.lease_id,
                   r.table_len);
        } else {
            printf("certd: %s (%s): answering the guest EAGAIN\n", v->certd.message,
                   certd_rc_name(rc));
            if (rc != CERTD_E_USAGE) v->connected = 0; /* reconnect at the next exit */
        }
    }
    run->snp_req_certs.ret = certd_guest_ret(rc, &r);
    if (rc == CERTD_OK && r.ret == CERTD_RET_ENOSPC)
        run->snp_req_certs.npages = r.npages; /* exact: ceil(len / 4096) */
    v->pending_lease = rc == CERTD_OK ? r.lease_id : 0;
    /* Complete the exit at once: KVM_RUN returns -EINTR when the report is signed. */
    run->immediate_exit = 1;
}

/* KVM_RUN with immediate_exit set: KVM hands ret (and npages) to the firmware, which signs
 * the report with the key matching the table, and returns -EINTR. */
static int sim_kvm_run(struct sim_kvm_run *run) {
    if (!run->immediate_exit) return 0;
    if (run->snp_req_certs.ret == CERTD_RET_OK) pause_at("report signing, lease held");
    return -EINTR;
}

static void on_eintr(struct vmm *v, struct sim_kvm_run *run) {
    if (v->pending_lease) {
        if (v->skip_release) {
            printf("vmm: NOT releasing lease %llu (-R)\n", (unsigned long long)v->pending_lease);
        } else {
            uint32_t result = 0;
            int rc = certd_release(&v->certd, v->pending_lease, &result);
            static const char *names[] = { "released", "unknown", "expired" };
            if (rc == CERTD_OK)
                printf("vmm: RELEASE lease=%llu -> %s\n", (unsigned long long)v->pending_lease,
                       names[result]);
            else {
                /* Nothing to tell the guest: certd ends the lease with the connection. */
                printf("vmm: RELEASE failed: %s; reconnecting\n", v->certd.message);
                v->connected = 0;
            }
        }
        v->pending_lease = 0;
    }
    run->immediate_exit = 0;
}

static int parse_num(const char *s, unsigned long long max, unsigned long long *out) {
    char *end;
    errno = 0;
    if (!*s || *s == '-') return -1;
    unsigned long long n = strtoull(s, &end, 10);
    if (errno || *end || n > max) return -1;
    *out = n;
    return 0;
}

static void usage(FILE *to) {
    fprintf(to, "usage: vmm-example [-s SOCKET] [-t TIMEOUT_MS] [-g GUEST_NPAGES] [-o FILE] "
                "[-r RETRIES] [-d RETRY_MS] [-W] [-R] VM_ID\n");
}

int main(int argc, char **argv) {
    const char *sock = CERTD_DEFAULT_SOCKET, *out = NULL;
    unsigned long long tmo = 1000, gpages = 1, retries = 3, retry_ms = 2000;
    struct vmm v = { .skip_release = 0 };
    int c;
    while ((c = getopt(argc, argv, "s:t:g:o:r:d:WRh")) != -1) {
        unsigned long long *num = NULL, max = 0;
        switch (c) {
        case 's': sock = optarg; break;
        case 't': num = &tmo; max = 600000; break;
        case 'g': num = &gpages; max = 16; break; /* a Linux guest offers at most 16 KiB */
        case 'o': out = optarg; break;
        case 'r': num = &retries; max = 100; break;
        case 'd': num = &retry_ms; max = 60000; break;
        case 'W': pause_mode = 1; break;
        case 'R': v.skip_release = 1; break;
        case 'h': usage(stdout); return 0;
        default: usage(stderr); return 2;
        }
        if (num && (parse_num(optarg, max, num) || (num == &tmo && tmo == 0))) {
            fprintf(stderr, "vmm-example: -%c: not a number in 0..%llu: %s\n", c, max, optarg);
            return 2;
        }
    }
    if (optind + 1 != argc || !certd_valid_vm_id(argv[optind])) {
        usage(stderr);
        return 2;
    }
    v.vm_id = argv[optind];

    /* One connection for the VMM's life; a failure is retried at the next exit. */
    v.connected = certd_connect(&v.certd, sock, (int)tmo) == CERTD_OK;
    if (!v.connected) printf("vmm: %s (will retry at the next exit)\n", v.certd.message);

    guest_mem_pages = 16;
    guest_mem = calloc(guest_mem_pages, CERTD_PAGE_SIZE);
    if (!guest_mem) return 70;

    struct sim_kvm_run run = { 0 };
    uint64_t offer = gpages;
    uint32_t ret = CERTD_RET_EAGAIN; /* what the guest last got */
    for (unsigned long long exits = 1; exits <= retries + 1; exits++) {
        /* The guest zero-fills its shared buffer and issues the request. */
        memset(guest_mem, 0, offer * CERTD_PAGE_SIZE);
        run.snp_req_certs.gpa = GUEST_GPA;
        run.snp_req_certs.npages = offer;
        run.snp_req_certs.ret = 0;
        printf("exit %llu: KVM_EXIT_SNP_REQ_CERTS vm=%s gpa=%#llx npages=%llu\n", exits, v.vm_id,
               (unsigned long long)GUEST_GPA, (unsigned long long)offer);

        handle_req_certs(&v, &run);
        if (sim_kvm_run(&run) == -EINTR) on_eintr(&v, &run);

        ret = (uint32_t)run.snp_req_certs.ret;
        printf("guest: ret=%u (%s)", ret, certd_ret_name(ret));
        if (ret == CERTD_RET_ENOSPC) {
            offer = run.snp_req_certs.npages;
            printf(", retries with %llu page(s)\n", (unsigned long long)offer);
            if (offer > guest_mem_pages) break; /* more than a guest offers */
            continue;
        }
        if (ret == CERTD_RET_EAGAIN) {
            printf(", retries in %llu ms\n", retry_ms);
            struct timespec ts = { (time_t)(retry_ms / 1000), (long)(retry_ms % 1000) * 1000000L };
            while (nanosleep(&ts, &ts) < 0 && errno == EINTR) {}
            continue;
        }
        printf("\n");
        break;
    }
    pause_at("before disconnect");
    certd_close(&v.certd);

    int rc = ret == CERTD_RET_OK ? 0 : ret == CERTD_RET_EIO ? 69 : 75;
    if (out) {
        FILE *fp = fopen(out, "wb");
        size_t len = (size_t)offer * CERTD_PAGE_SIZE;
        if (!fp || fwrite(guest_mem, 1, len, fp) != len || fclose(fp) != 0) {
            fprintf(stderr, "vmm-example: cannot write %s: %s\n", out, strerror(errno));
            rc = 74;
        }
    }
    free(guest_mem);
    printf("vmm: done, guest ret=%u (%s)\n", ret, certd_ret_name(ret));
    return rc;
}
