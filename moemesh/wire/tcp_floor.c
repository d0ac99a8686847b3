/* The kernel's floor for one dispatch hop, measured in the process that asks (moemesh/wire/tcp_floor.py loads it;
   `moemesh bench --mesh` prints it beside the hop): a C ping-pong of n bytes over loopback TCP, no Python in it.

   Two threads of this process bounce the bytes over one TCP_NODELAY connection on 127.0.0.1: the caller's thread
   sends n bytes and reads them back, an echo thread reads n and sends them back. Receives either spin (recv with
   MSG_DONTWAIT until bytes come, as the pair stream's C receive spins: p2p_native.c spin_recv) or block. The
   spinning round trip is the floor of a hop whose two ends spin on two cores (the torch transport's tcp stream);
   the blocking one is what a blocking echo pays: on one core when the scheduler puts the woken echo beside its
   waker, across cores (a halted vCPU woken by an interrupt) when it does not; `one_core` pins both threads to
   the caller's CPU for the first case (the caller's own affinity is restored after). Threads of one process
   take the same loopback path as two processes: the kernel's TCP stack does not look at the process.

   Every call and wait is bounded (SO_RCVTIMEO / SO_SNDTIMEO of 5 s, a spin deadline of the same): a stuck peer
   ends the measurement with an error code, never a hang. */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#define WAIT_S 5

int64_t mm_tcp_floor_abi(void) { return 2; }

static double now_s(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + t.tv_nsec * 1e-9;
}

/* Read exactly n bytes into buf: 0, or -errno (-ETIMEDOUT after WAIT_S, -EPIPE when the peer closed). */
static int read_n(int fd, char *buf, int64_t n, int spin) {
    double until = now_s() + WAIT_S;
    for (int64_t got = 0; got < n;) {
        ssize_t r = recv(fd, buf + got, (size_t)(n - got), spin ? MSG_DONTWAIT : 0);
        if (r > 0) {
            got += r;
            continue;
        }
        if (r == 0) return -EPIPE;
        if (errno == EINTR) continue;
        if (errno != EAGAIN && errno != EWOULDBLOCK) return -errno;
        if (!spin || now_s() > until) return -ETIMEDOUT; /* blocking: SO_RCVTIMEO ran out */
    }
    return 0;
}

static int write_n(int fd, const char *buf, int64_t n) {
    for (int64_t sent = 0; sent < n;) {
        ssize_t w = send(fd, buf + sent, (size_t)(n - sent), MSG_NOSIGNAL);
        if (w < 0) {
            if (errno == EINTR) continue;
            return errno == EAGAIN || errno == EWOULDBLOCK ? -ETIMEDOUT : -errno;
        }
        sent += w;
    }
    return 0;
}

static int bounded(int fd) {
    struct timeval tv = {WAIT_S, 0};
    int one = 1;
    if (setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv) || setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv) ||
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one))
        return -errno;
    return 0;
}

typedef struct {
    int fd, spin, rc, cpu; /* cpu: pin the echo there (-1: anywhere) */
    int64_t n, rounds;
} echo_args;

static int pin_to(int cpu) {
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
    return -pthread_setaffinity_np(pthread_self(), sizeof set, &set);
}

static void *echo(void *p) {
    echo_args *a = p;
    if (a->cpu >= 0 && (a->rc = pin_to(a->cpu)) != 0) {
        shutdown(a->fd, SHUT_RDWR);
        return NULL;
    }
    char *buf = malloc((size_t)a->n);
    if (!buf) a->rc = -ENOMEM;
    for (int64_t i = 0; i < a->rounds && a->rc == 0; i++)
        if ((a->rc = read_n(a->fd, buf, a->n, a->spin)) == 0) a->rc = write_n(a->fd, buf, a->n);
    free(buf);
    shutdown(a->fd, SHUT_RDWR); /* the caller's read ends at once if this side stopped early */
    return NULL;
}

static int cmp_double(const void *x, const void *y) {
    double a = *(const double *)x, b = *(const double *)y;
    return (a > b) - (a < b);
}

/* Connected loopback sockets: *client and *server, or -errno. */
static int connect_pair(int *client, int *server) {
    struct sockaddr_in addr = {0};
    socklen_t len = sizeof addr;
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    int lst = socket(AF_INET, SOCK_STREAM, 0), rc = 0;
    *client = *server = -1;
    if (lst < 0) return -errno;
    if (bind(lst, (struct sockaddr *)&addr, sizeof addr) || listen(lst, 1) ||
        getsockname(lst, (struct sockaddr *)&addr, &len) || (*client = socket(AF_INET, SOCK_STREAM, 0)) < 0 ||
        connect(*client, (struct sockaddr *)&addr, sizeof addr) || (*server = accept(lst, NULL, NULL)) < 0)
        rc = -errno;
    close(lst);
    if (rc == 0 && (rc = bounded(*client)) == 0) rc = bounded(*server);
    return rc;
}

/* The median round trip in microseconds of `rounds` timed ping-pongs of n bytes (after warmup untimed ones),
   spinning (spin != 0) or blocking receives on both ends, on one core (one_core != 0: both threads pinned to the
   caller's CPU) or wherever the scheduler puts them: *out_us. 0, or -errno. */
int64_t mm_tcp_floor(int64_t n, int64_t warmup, int64_t rounds, int32_t spin, int32_t one_core, double *out_us) {
    if (n < 1 || rounds < 1 || warmup < 0) return -EINVAL;
    cpu_set_t mine;
    int cpu = one_core ? sched_getcpu() : -1, pinned = 0;
    if (one_core && cpu < 0) return errno ? -errno : -EINVAL;
    if (one_core) { /* pthread_* return their error number and leave errno alone */
        int err = pthread_getaffinity_np(pthread_self(), sizeof mine, &mine);
        if (err) return -err;
    }
    int client, server, rc = connect_pair(&client, &server);
    char *buf = malloc((size_t)n);
    double *times = malloc(sizeof(double) * (size_t)rounds);
    echo_args a = {server, spin, 0, cpu, n, warmup + rounds};
    pthread_t th;
    int started = 0;
    if (rc == 0 && (!buf || !times)) rc = -ENOMEM;
    if (rc == 0 && cpu >= 0) pinned = (rc = pin_to(cpu)) == 0;
    if (rc == 0) {
        memset(buf, 'x', (size_t)n);
        rc = -pthread_create(&th, NULL, echo, &a);
        started = rc == 0;
    }
    for (int64_t i = 0; rc == 0 && i < warmup + rounds; i++) {
        double t0 = now_s();
        if ((rc = write_n(client, buf, n)) == 0 && (rc = read_n(client, buf, n, spin)) == 0 && i >= warmup)
            times[i - warmup] = (now_s() - t0) * 1e6;
    }
    if (client >= 0) shutdown(client, SHUT_RDWR); /* the echo's read ends at once if this side stopped early */
    if (started) {
        pthread_join(th, NULL);
        if (a.rc != 0) rc = a.rc; /* the echo's own failure (a pin, a timeout) is the cause of this side's */
    }
    if (rc == 0) {
        qsort(times, (size_t)rounds, sizeof(double), cmp_double);
        *out_us = times[rounds / 2];
    }
    if (pinned) pthread_setaffinity_np(pthread_self(), sizeof mine, &mine);
    if (client >= 0) close(client);
    if (server >= 0) close(server);
    free(buf);
    free(times);
    return rc;
}
