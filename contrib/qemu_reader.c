/*
 * qemu_reader: read the certificate blob the way QEMU's SNP certificate patch does
 * (RFC v2 "i386/sev: Add KVM_EXIT_SNP_REQ_CERTS support", open_certs_locked()), to test
 * certd's updaters against a stock VMM.
 *
 * One read, as QEMU does it for one KVM_EXIT_SNP_REQ_CERTS exit:
 *   loop until timeout:
 *     fd = open(path, O_RDONLY); fstat(fd)
 *     fcntl(fd, F_OFD_SETLK, {F_RDLCK, SEEK_SET, 0, 0})   non-blocking, whole file
 *       EAGAIN/EACCES: close, sleep 1 ms, retry (QEMU sleeps 1 ms after every attempt)
 *     stat(path): gone or another inode -> close, retry ("recreated")
 *   read the whole file, hold the lock (QEMU: until the report is signed), unlock, close.
 * QEMU compares st_ino only; we compare st_dev too and check st_nlink, as certd does.
 *
 * Every read appends one line to OUT:
 *   ok <acquired_ns> <released_ns> <retries_busy> <retries_replaced> <length> <hex bytes>
 *   timeout <start_ns> <end_ns> <retries_busy> <retries_replaced> 0 -
 * Times are CLOCK_MONOTONIC nanoseconds, comparable with Python's time.monotonic_ns().
 *
 * usage: qemu_reader PATH OUT TIMEOUT_MS HOLD_MS COUNT [GAP_MS]
 *   COUNT reads (0: until SIGTERM), each holding the lock HOLD_MS after reading,
 *   GAP_MS between reads (default 0). Exit 0, or 1 on a fatal error (QEMU would exit too).
 * build: gcc -O2 -Wall -o qemu_reader qemu_reader.c
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

static volatile sig_atomic_t stop;
static void on_term(int sig) { (void)sig; stop = 1; }

static int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static void sleep_ms(long ms)
{
    struct timespec ts = { ms / 1000, (ms % 1000) * 1000000L };
    while (nanosleep(&ts, &ts) == -1 && errno == EINTR && !stop)
        ;
}

static int ofd_lock(int fd, short type)
{
    struct flock fl;
    memset(&fl, 0, sizeof fl);  /* l_pid must be 0 for OFD locks */
    fl.l_type = type;
    fl.l_whence = SEEK_SET;
    fl.l_start = 0;
    fl.l_len = 0;               /* whole file, as QEMU's qemu_lock_fd(fd, 0, 0, false) */
    int r;
    do {
        r = fcntl(fd, F_OFD_SETLK, &fl);
    } while (r == -1 && errno == EINTR);
    return r == -1 ? -errno : 0;
}

/* open_certs_locked(): a locked fd on the current inode, -EAGAIN if busy, else -errno. */
static int open_locked(const char *path, long *replaced)
{
    for (;;) {
        int fd = open(path, O_RDONLY | O_CLOEXEC);
        if (fd < 0)
            return -errno;
        struct stat b, a;
        if (fstat(fd, &b) < 0) {
            int e = errno;
            close(fd);
            return -e;
        }
        int r = ofd_lock(fd, F_RDLCK);
        if (r == -EAGAIN || r == -EACCES) {
            close(fd);
            return -EAGAIN;
        }
        if (r < 0) {
            close(fd);
            return r;
        }
        if (stat(path, &a) < 0 || a.st_ino != b.st_ino || a.st_dev != b.st_dev) {
            close(fd);      /* disappeared or recreated: drop the stale lock, retry */
            (*replaced)++;
            continue;
        }
        if (fstat(fd, &b) < 0 || b.st_nlink == 0) {
            close(fd);
            (*replaced)++;
            continue;
        }
        return fd;
    }
}

int main(int argc, char **argv)
{
    if (argc < 6) {
        fprintf(stderr, "usage: %s PATH OUT TIMEOUT_MS HOLD_MS COUNT [GAP_MS]\n", argv[0]);
        return 2;
    }
    const char *path = argv[1];
    long timeout_ms = atol(argv[3]), hold_ms = atol(argv[4]), count = atol(argv[5]);
    long gap_ms = argc > 6 ? atol(argv[6]) : 0;
    FILE *out = fopen(argv[2], "a");
    if (!out) {
        perror(argv[2]);
        return 1;
    }
    signal(SIGTERM, on_term);
    signal(SIGINT, on_term);

    static unsigned char buf[1 << 20];
    static char line[2 * (1 << 20) + 256];
    for (long n = 0; (count == 0 || n < count) && !stop; n++) {
        long busy = 0, replaced = 0;
        int64_t start = now_ns(), deadline = start + (int64_t)timeout_ms * 1000000;
        int fd;
        /* kvm_handle_snp_req_certs(): retry with a 1 ms sleep until the timeout */
        for (;;) {
            fd = open_locked(path, &replaced);
            if (fd != -EAGAIN)
                break;
            busy++;
            sleep_ms(1);
            if (now_ns() >= deadline || stop)
                break;
        }
        if (fd == -EAGAIN) {
            fprintf(out, "timeout %lld %lld %ld %ld 0 -\n", (long long)start,
                    (long long)now_ns(), busy, replaced);
            fflush(out);
            continue;
        }
        if (fd < 0) {
            fprintf(stderr, "qemu_reader: %s: %s\n", path, strerror(-fd));
            return 1;
        }
        int64_t acquired = now_ns();
        size_t len = 0;
        for (;;) {
            ssize_t r = pread(fd, buf + len, sizeof buf - len, (off_t)len);
            if (r < 0 && errno == EINTR)
                continue;
            if (r < 0) {
                perror("pread");
                return 1;
            }
            if (r == 0 || len + (size_t)r == sizeof buf) {
                len += (size_t)r;
                break;
            }
            len += (size_t)r;
        }
        if (hold_ms > 0)
            sleep_ms(hold_ms);
        int64_t released = now_ns();
        ofd_lock(fd, F_UNLCK);     /* snp_release_certs_lock(): unlock, then close */
        close(fd);

        int k = snprintf(line, 256, "ok %lld %lld %ld %ld %zu ", (long long)acquired,
                         (long long)released, busy, replaced, len);
        static const char hex[] = "0123456789abcdef";
        for (size_t i = 0; i < len; i++) {
            line[k++] = hex[buf[i] >> 4];
            line[k++] = hex[buf[i] & 15];
        }
        if (len == 0)
            line[k++] = '-';
        line[k++] = '\n';
        fwrite(line, 1, (size_t)k, out);
        fflush(out);
        if (gap_ms > 0)
            sleep_ms(gap_ms);
    }
    fclose(out);
    return 0;
}
