/* The kernel's floor for one dispatch hop: a C ping-pong of N bytes over loopback TCP (issue 17's yardstick).
 *
 *   cc -O2 -o /tmp/tcp_pingpong scripts/tcp_pingpong.c && /tmp/tcp_pingpong 2155 && /tmp/tcp_pingpong 67881
 *   taskset -c 0 /tmp/tcp_pingpong 2155 block    # both ends on one core (spinning there starves the peer)
 *
 * A parent and a forked child bounce N bytes (TCP_NODELAY) 20000 times, receiving either blocking (recv) or
 * spinning (recv with MSG_DONTWAIT in a loop, as the pair stream's C receive spins: moemesh/wire/p2p_native.c),
 * and print the median round trip and the median time in send() per mode. No Python anywhere: what is left is
 * the kernel's loopback path and the scheduler. `moemesh bench --mesh`'s "raw TCP echo" is a blocking Python
 * echo that the scheduler usually runs on one core (a woken task follows its waker): compare it with this
 * program under taskset -c 0, and the mesh's hop (two processes spinning on two cores) with the spinning mode
 * unpinned. Measured on the 2-vCPU Xeon VM of 2026-12-02: blocking across cores 75 us at 2155 B (waking a
 * halted vCPU), spinning across cores 8.5 us, blocking on one core 4.4 us (13.2 us at 67881 B). */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define ROUNDS 20000

static double now_s(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + t.tv_nsec * 1e-9;
}

/* n bytes into buf: blocking recv, or spinning on recv(MSG_DONTWAIT); -1 once the peer is gone. */
static int read_all(int fd, char *buf, size_t n, int spin) {
    size_t got = 0;
    while (got < n) {
        ssize_t r = recv(fd, buf + got, n - got, spin ? MSG_DONTWAIT : 0);
        if (r < 0 && spin) continue;  /* EAGAIN: nothing yet */
        if (r <= 0) return -1;
        got += (size_t)r;
    }
    return 0;
}

static int by_value(const void *a, const void *b) {
    const double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static void run(size_t n, int spin) {
    int listener = socket(AF_INET, SOCK_STREAM, 0), one = 1;
    struct sockaddr_in addr = {0};
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t len = sizeof addr;
    if (bind(listener, (struct sockaddr *)&addr, sizeof addr) || listen(listener, 1) ||
        getsockname(listener, (struct sockaddr *)&addr, &len)) {
        perror("listen");
        exit(1);
    }
    char *buf = calloc(n, 1);
    pid_t child = fork();
    if (child == 0) {  /* the echo end */
        int c = accept(listener, NULL, NULL);
        setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        for (int i = 0; i < ROUNDS && read_all(c, buf, n, spin) == 0; i++) send(c, buf, n, 0);
        _exit(0);
    }
    int s = socket(AF_INET, SOCK_STREAM, 0);
    if (connect(s, (struct sockaddr *)&addr, sizeof addr)) {
        perror("connect");
        exit(1);
    }
    setsockopt(s, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    double *rtt = malloc(ROUNDS * sizeof *rtt), *in_send = malloc(ROUNDS * sizeof *in_send);
    for (int i = 0; i < ROUNDS; i++) {
        const double t0 = now_s();
        send(s, buf, n, 0);
        const double t1 = now_s();
        if (read_all(s, buf, n, spin)) break;
        rtt[i] = now_s() - t0, in_send[i] = t1 - t0;
    }
    qsort(rtt, ROUNDS, sizeof *rtt, by_value);
    qsort(in_send, ROUNDS, sizeof *in_send, by_value);
    printf("%zu B, %s: round trip %.1f us, in send() %.1f us (medians of %d)\n", n, spin ? "spinning" : "blocking",
           rtt[ROUNDS / 2] * 1e6, in_send[ROUNDS / 2] * 1e6, ROUNDS);
    close(s);
    waitpid(child, NULL, 0);
    close(listener);
    free(buf), free(rtt), free(in_send);
}

int main(int argc, char **argv) {
    const size_t n = argc > 1 ? (size_t)atol(argv[1]) : 2155;
    const char *mode = argc > 2 ? argv[2] : "both";
    if (n == 0 || (strcmp(mode, "both") && strcmp(mode, "block") && strcmp(mode, "spin"))) {
        fprintf(stderr, "usage: %s BYTES [both|block|spin]  (BYTES > 0)\n", argv[0]);
        return 2;
    }
    if (strcmp(mode, "spin")) run(n, 0);
    if (strcmp(mode, "block")) run(n, 1);
    return 0;
}
