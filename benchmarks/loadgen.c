/*
 * loadgen: closed-loop load generator for the certd socket protocol (v1), and a
 * QEMU-style in-process reader baseline.
 *
 * Socket mode (default, and --raw):
 *   N connections, each in a closed loop: GET (vm id "bench-<conn>", npages) -> GET_REPLY;
 *   if ret == 0 and a lease id came back: RELEASE (lease) -> RELEASE_REPLY. One "op" is
 *   that GET + RELEASE pair (two round trips); its latency runs from the GET's send to the
 *   RELEASE_REPLY's receipt. A GET_REPLY with ret != 0 or without a lease, or an ERROR
 *   frame, ends the op as failed (counted, no latency) and the connection starts the next
 *   GET at once. --raw talks the same frames to the raw ceiling server; the only difference
 *   is that it does not require the RELEASE_REPLY result to be RELEASED.
 *   Phases: warm-up (--warmup s, not counted) then measure (--seconds s); then stop.
 *
 * --qemu-reader PATH: what a stock QEMU does per request, in one process, no socket:
 *   open -> F_OFD_SETLK F_RDLCK (non-blocking; busy: sleep 1 ms, retry) -> fstat + stat
 *   inode check -> pread the whole blob -> F_UNLCK -> close.
 *
 * Output: one JSON object on stdout. Exit 0 if the run completed (errors are reported in
 * the JSON, not by the exit code), 1 on a setup failure or a stall (no progress for 5 s).
 * --cpu-pid PID: also report that process's CPU time (utime+stime from /proc) during the
 * measurement window, as a fraction of one core.
 *
 * Build: cc -O2 -Wall -Wextra -o loadgen loadgen.c
 * Usage: loadgen --socket PATH [--conns N] [--warmup S] [--seconds S] [--npages N] [--raw]
 *                [--cpu-pid PID]
 *        loadgen --qemu-reader PATH [--warmup S] [--seconds S]
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#define HEADER_SIZE 16
#define MAX_FRAME 65536
#define RBUF (2 * MAX_FRAME)

enum { T_GET = 0x01, T_RELEASE = 0x02, T_GET_REPLY = 0x81, T_RELEASE_REPLY = 0x82,
       T_ERROR = 0xFF };

static void put16(uint8_t *p, uint16_t v) { p[0] = (uint8_t)v; p[1] = (uint8_t)(v >> 8); }
static void put32(uint8_t *p, uint32_t v) { for (int i = 0; i < 4; i++) p[i] = (uint8_t)(v >> (8 * i)); }
static void put64(uint8_t *p, uint64_t v) { for (int i = 0; i < 8; i++) p[i] = (uint8_t)(v >> (8 * i)); }
static uint16_t get16(const uint8_t *p) { return (uint16_t)(p[0] | p[1] << 8); }
static uint32_t get32(const uint8_t *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}
static uint64_t get64(const uint8_t *p) { return (uint64_t)get32(p) | (uint64_t)get32(p + 4) << 32; }

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void die(const char *what) {
    fprintf(stderr, "loadgen: %s: %s\n", what, strerror(errno));
    exit(1);
}

/* ---- latency samples ---------------------------------------------------------------- */
static uint32_t *lat;          /* microseconds * 10 would overflow nothing: store ns/100 */
static size_t nlat, caplat;

static void record(uint64_t ns) {
    if (nlat == caplat) {
        caplat = caplat ? caplat * 2 : 1 << 20;
        lat = realloc(lat, caplat * sizeof *lat);
        if (!lat) die("realloc");
    }
    uint64_t v = ns / 100;  /* 0.1 µs units */
    lat[nlat++] = v > UINT32_MAX ? UINT32_MAX : (uint32_t)v;
}

static int cmp_u32(const void *a, const void *b) {
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return x < y ? -1 : x > y;
}

static double pct(double p) {
    if (!nlat) return 0;
    size_t i = (size_t)(p * (double)(nlat - 1) + 0.5);
    return lat[i] / 10.0;
}

/* ---- CPU time of another process ------------------------------------------------------- */
/* utime+stime of pid in clock ticks; *sys gets stime alone (the kernel's share). */
static long long proc_cpu_ticks(int pid, long long *sys) {
    char path[64], buf[1024];
    snprintf(path, sizeof path, "/proc/%d/stat", pid);
    FILE *f = fopen(path, "r");
    if (!f) return -1;
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    buf[n] = 0;
    char *p = strrchr(buf, ')');  /* comm may contain spaces */
    if (!p) return -1;
    unsigned long utime = 0, stime = 0;
    /* after ") ": state(3) ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt utime(14) stime(15) */
    if (sscanf(p + 2, "%*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %lu %lu", &utime, &stime) != 2)
        return -1;
    *sys = (long long)stime;
    return (long long)(utime + stime);
}

/* ---- socket mode ---------------------------------------------------------------------- */
struct conn {
    int fd;
    int idx;
    uint32_t rid;
    uint64_t op_start;
    size_t have;
    uint8_t vm[32];
    size_t vmlen;
    uint8_t buf[RBUF];
};

static struct {
    uint64_t ops, failed_ops, errors, nonzero_ret, no_lease, release_not_released,
        protocol, bytes_table;
    uint64_t ret_hist[64];
    uint64_t err_codes[64];
} st;

static int measuring;
static int npages = 4;
static int raw_mode;

static void send_all(struct conn *c, const uint8_t *p, size_t n) {
    while (n) {
        ssize_t w = send(c->fd, p, n, MSG_NOSIGNAL);
        if (w < 0) {
            if (errno == EINTR) continue;
            die("send");
        }
        p += w;
        n -= (size_t)w;
    }
}

static void header(uint8_t *h, uint8_t type, uint32_t rid, uint32_t len) {
    memcpy(h, "CRTD", 4);
    h[4] = 1;
    h[5] = type;
    put16(h + 6, 0);
    put32(h + 8, rid);
    put32(h + 12, len);
}

static void send_get(struct conn *c, uint64_t t) {
    uint8_t f[HEADER_SIZE + 16 + 64];
    if (++c->rid == 0) c->rid = 1;
    header(f, T_GET, c->rid, (uint32_t)(16 + c->vmlen));
    put64(f + 16, (uint64_t)npages);
    put32(f + 24, 0);          /* timeout_ms: server default */
    put16(f + 28, 0);
    put16(f + 30, (uint16_t)c->vmlen);
    memcpy(f + 32, c->vm, c->vmlen);
    c->op_start = t;
    send_all(c, f, 32 + c->vmlen);
}

static void send_release(struct conn *c, uint64_t lease) {
    uint8_t f[HEADER_SIZE + 8];
    if (++c->rid == 0) c->rid = 1;
    header(f, T_RELEASE, c->rid, 8);
    put64(f + 16, lease);
    send_all(c, f, sizeof f);
}

/* One complete frame. Returns 1 if the op ended (a new GET must be sent). */
static int on_frame(struct conn *c, const uint8_t *f, uint32_t len, uint64_t t) {
    uint8_t type = f[5];
    const uint8_t *p = f + HEADER_SIZE;
    if (memcmp(f, "CRTD", 4) != 0 || f[4] != 1) {
        st.protocol++;
        fprintf(stderr, "loadgen: bad frame header on conn %d\n", c->idx);
        exit(1);
    }
    if (type == T_GET_REPLY && len >= 40) {
        uint32_t ret = get32(p);
        uint64_t lease = get64(p + 24);
        uint32_t tlen = get32(p + 32);
        if (ret != 0) {
            if (measuring) { st.nonzero_ret++; st.ret_hist[ret & 63]++; st.failed_ops++; }
            return 1;
        }
        if (lease == 0) {
            if (measuring) { st.no_lease++; st.failed_ops++; }
            return 1;
        }
        if (measuring) st.bytes_table += tlen;
        send_release(c, lease);
        return 0;
    }
    if (type == T_RELEASE_REPLY && len == 16) {
        uint32_t result = get32(p + 8);
        if (measuring) {
            if (result != 0 && !raw_mode) st.release_not_released++;
            st.ops++;
            record(t - c->op_start);
        }
        return 1;
    }
    if (type == T_ERROR && len >= 8) {
        if (measuring) { st.errors++; st.err_codes[get16(p) & 63]++; st.failed_ops++; }
        return 1;
    }
    st.protocol++;
    fprintf(stderr, "loadgen: unexpected frame type %#x len %u on conn %d\n", type, len, c->idx);
    exit(1);
}

static int connect_unix(const char *path) {
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) die("socket");
    struct sockaddr_un a = {.sun_family = AF_UNIX};
    if (strlen(path) >= sizeof a.sun_path) { errno = ENAMETOOLONG; die("socket path"); }
    strcpy(a.sun_path, path);
    if (connect(fd, (struct sockaddr *)&a, sizeof a) < 0) die("connect");
    return fd;
}

static int run_socket(const char *path, int nconns, double warmup, double seconds, int cpu_pid) {
    int ep = epoll_create1(EPOLL_CLOEXEC);
    if (ep < 0) die("epoll_create1");
    struct conn **cs = calloc((size_t)nconns, sizeof *cs);
    if (!cs) die("calloc");
    for (int i = 0; i < nconns; i++) {
        struct conn *c = calloc(1, sizeof *c);
        if (!c) die("calloc");
        c->idx = i;
        c->fd = connect_unix(path);
        c->vmlen = (size_t)snprintf((char *)c->vm, sizeof c->vm, "bench-%d", i);
        struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
        if (epoll_ctl(ep, EPOLL_CTL_ADD, c->fd, &ev) < 0) die("epoll_ctl");
        cs[i] = c;
    }
    uint64_t t0 = now_ns();
    uint64_t t_meas = t0 + (uint64_t)(warmup * 1e9);
    uint64_t t_end = t_meas + (uint64_t)(seconds * 1e9);
    uint64_t last_progress = t0;
    long long cpu0 = -1, cpu1 = -1, sys0 = 0, sys1 = 0;
    uint64_t cpu_t0 = 0, cpu_t1 = 0;
    for (int i = 0; i < nconns; i++) send_get(cs[i], t0);

    struct epoll_event evs[256];
    for (;;) {
        int n = epoll_wait(ep, evs, 256, 100);
        if (n < 0) {
            if (errno == EINTR) continue;
            die("epoll_wait");
        }
        uint64_t t = now_ns();
        if (!measuring && t >= t_meas && t < t_end) {
            measuring = 1;
            if (cpu_pid > 0) { cpu0 = proc_cpu_ticks(cpu_pid, &sys0); cpu_t0 = now_ns(); }
            t = now_ns();
        }
        if (t >= t_end) {
            if (cpu_pid > 0 && measuring) { cpu1 = proc_cpu_ticks(cpu_pid, &sys1); cpu_t1 = now_ns(); }
            break;
        }
        if (n > 0) last_progress = t;
        else if (t - last_progress > 5000000000ull) {
            fprintf(stderr, "loadgen: no reply for 5 s; server stalled\n");
            return 1;
        }
        for (int k = 0; k < n; k++) {
            struct conn *c = evs[k].data.ptr;
            ssize_t r = recv(c->fd, c->buf + c->have, RBUF - c->have, MSG_DONTWAIT);
            if (r < 0) {
                if (errno == EAGAIN || errno == EINTR) continue;
                die("recv");
            }
            if (r == 0) {
                fprintf(stderr, "loadgen: server closed connection %d\n", c->idx);
                return 1;
            }
            c->have += (size_t)r;
            size_t off = 0;
            int new_op = 0;
            while (c->have - off >= HEADER_SIZE) {
                uint32_t len = get32(c->buf + off + 12);
                if (len > MAX_FRAME - HEADER_SIZE) {
                    fprintf(stderr, "loadgen: frame of %u bytes\n", len);
                    return 1;
                }
                if (c->have - off < HEADER_SIZE + len) break;
                new_op |= on_frame(c, c->buf + off, len, t);
                off += HEADER_SIZE + len;
            }
            if (off) {
                memmove(c->buf, c->buf + off, c->have - off);
                c->have -= off;
            }
            if (new_op) send_get(c, now_ns());
        }
    }
    for (int i = 0; i < nconns; i++) {
        close(cs[i]->fd);
        free(cs[i]);
    }
    free(cs);
    close(ep);

    qsort(lat, nlat, sizeof *lat, cmp_u32);
    double secs = seconds;
    printf("{\"mode\": \"%s\", \"conns\": %d, \"seconds\": %.3f, \"ops\": %llu, "
           "\"ops_per_s\": %.1f, \"p50_us\": %.1f, \"p90_us\": %.1f, \"p99_us\": %.1f, "
           "\"max_us\": %.1f, \"failed_ops\": %llu, \"errors\": %llu, \"nonzero_rets\": %llu, "
           "\"no_lease\": %llu, \"release_not_released\": %llu, \"table_bytes_per_op\": %.1f",
           raw_mode ? "raw" : "certd", nconns, secs, (unsigned long long)st.ops,
           (double)st.ops / secs, pct(0.50), pct(0.90), pct(0.99), nlat ? lat[nlat - 1] / 10.0 : 0.0,
           (unsigned long long)st.failed_ops, (unsigned long long)st.errors,
           (unsigned long long)st.nonzero_ret, (unsigned long long)st.no_lease,
           (unsigned long long)st.release_not_released,
           st.ops ? (double)st.bytes_table / (double)st.ops : 0.0);
    printf(", \"rets\": {");
    int first = 1;
    for (int i = 0; i < 64; i++)
        if (st.ret_hist[i]) { printf("%s\"%d\": %llu", first ? "" : ", ", i, (unsigned long long)st.ret_hist[i]); first = 0; }
    printf("}, \"error_codes\": {");
    first = 1;
    for (int i = 0; i < 64; i++)
        if (st.err_codes[i]) { printf("%s\"%d\": %llu", first ? "" : ", ", i, (unsigned long long)st.err_codes[i]); first = 0; }
    printf("}");
    if (cpu_pid > 0 && cpu0 >= 0 && cpu1 >= 0 && cpu_t1 > cpu_t0)
        printf(", \"server_cpu\": %.3f, \"server_sys\": %.3f",
               (double)(cpu1 - cpu0) / (double)sysconf(_SC_CLK_TCK) / ((double)(cpu_t1 - cpu_t0) / 1e9),
               (double)(sys1 - sys0) / (double)sysconf(_SC_CLK_TCK) / ((double)(cpu_t1 - cpu_t0) / 1e9));
    printf("}\n");
    return 0;
}

/* ---- QEMU-style reader ---------------------------------------------------------------- */
static int run_reader(const char *path, double warmup, double seconds) {
    struct flock rd = {.l_type = F_RDLCK, .l_whence = SEEK_SET};
    struct flock un = {.l_type = F_UNLCK, .l_whence = SEEK_SET};
    static uint8_t data[MAX_FRAME + 1];
    uint64_t busy = 0, replaced = 0, ops = 0, errors = 0;
    uint64_t t0 = now_ns();
    uint64_t t_meas = t0 + (uint64_t)(warmup * 1e9);
    uint64_t t_end = t_meas + (uint64_t)(seconds * 1e9);
    for (;;) {
        uint64_t t = now_ns();
        if (t >= t_end) break;
        int meas = t >= t_meas;
        int fd = open(path, O_RDONLY | O_CLOEXEC);
        if (fd < 0) { errors++; usleep(1000); continue; }
        if (fcntl(fd, F_OFD_SETLK, &rd) < 0) {
            close(fd);
            if (errno == EAGAIN || errno == EACCES) { busy += meas; usleep(1000); continue; }
            die("F_OFD_SETLK");
        }
        struct stat fs, ps;
        if (fstat(fd, &fs) < 0 || stat(path, &ps) < 0 || fs.st_ino != ps.st_ino ||
            fs.st_dev != ps.st_dev || fs.st_nlink == 0) {
            replaced += meas;
            close(fd);
            continue;
        }
        size_t size = (size_t)fs.st_size;
        ssize_t r = pread(fd, data, size < sizeof data ? size : sizeof data, 0);
        if (r < 0 || (size_t)r != size) errors += meas;
        fcntl(fd, F_OFD_SETLK, &un);
        close(fd);
        if (meas) {
            ops++;
            record(now_ns() - t);
        }
    }
    qsort(lat, nlat, sizeof *lat, cmp_u32);
    printf("{\"mode\": \"qemu-reader\", \"seconds\": %.3f, \"ops\": %llu, \"ops_per_s\": %.1f, "
           "\"p50_us\": %.1f, \"p99_us\": %.1f, \"busy\": %llu, \"replaced\": %llu, "
           "\"errors\": %llu}\n",
           seconds, (unsigned long long)ops, (double)ops / seconds, pct(0.50), pct(0.99),
           (unsigned long long)busy, (unsigned long long)replaced, (unsigned long long)errors);
    return 0;
}

static void usage(void) {
    fprintf(stderr,
            "usage: loadgen --socket PATH [--conns N] [--warmup S] [--seconds S] [--npages N]\n"
            "               [--raw] [--cpu-pid PID]\n"
            "       loadgen --qemu-reader PATH [--warmup S] [--seconds S]\n");
    exit(2);
}

int main(int argc, char **argv) {
    const char *sock = NULL, *reader = NULL;
    int nconns = 16, cpu_pid = 0;
    double warmup = 1.0, seconds = 5.0;
    static const struct option opts[] = {
        {"socket", required_argument, 0, 's'}, {"conns", required_argument, 0, 'c'},
        {"warmup", required_argument, 0, 'w'}, {"seconds", required_argument, 0, 't'},
        {"npages", required_argument, 0, 'n'}, {"raw", no_argument, 0, 'r'},
        {"cpu-pid", required_argument, 0, 'p'}, {"qemu-reader", required_argument, 0, 'q'},
        {0, 0, 0, 0}};
    int o;
    while ((o = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        switch (o) {
        case 's': sock = optarg; break;
        case 'c': nconns = atoi(optarg); break;
        case 'w': warmup = atof(optarg); break;
        case 't': seconds = atof(optarg); break;
        case 'n': npages = atoi(optarg); break;
        case 'r': raw_mode = 1; break;
        case 'p': cpu_pid = atoi(optarg); break;
        case 'q': reader = optarg; break;
        default: usage();
        }
    }
    /* Bounded: at most 60 s of warm-up + measurement, at most 4096 connections. */
    if (warmup < 0 || warmup > 30 || seconds <= 0 || seconds > 30) usage();
    if (reader) return run_reader(reader, warmup, seconds);
    if (!sock || nconns < 1 || nconns > 4096 || npages < 0) usage();
    return run_socket(sock, nconns, warmup, seconds, cpu_pid);
}
