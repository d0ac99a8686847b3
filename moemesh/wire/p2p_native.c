/* The tcp pair stream's per-message loop in C (moemesh/wire/p2p_native.py loads it; p2p_socket.py calls it).

   The same wire as the Python path of p2p_socket.py, byte for byte: each message is an 8-byte little-endian
   length and its bytes; frames are p2p.py's. What moves here is only the work per message that Python makes
   expensive: one gathering sendmsg of a request or a reply (ids narrowed to int32 on the way), the staging
   buffer's receive loop (one recv when the message came whole), and the expert node's O(1)-per-id checks of
   ids and weights. Every function returns a negative code instead of raising; the Python side turns each into
   the same error its own path gives. The caller holds no GIL while these block (ctypes releases it).

   A receive spins a little before it blocks (spin_recv): a thread blocked in recv parks its CPU, and in a
   virtual machine without guest halt polling (guest_halt_poll_ns = 0, as on the machines we test on) the
   sender's wake-up is then an interrupt into a halted vCPU: a VM exit on each side, paid inside the sender's
   sendmsg, and a cold cache on the woken side. Measured (scripts/hop_cpu.py, batch 1): a hop of ~40 us or
   ~200 us (whether the host's adaptive halt polling catches the wake-ups); with the spin, ~25-30 us. */
#ifndef _GNU_SOURCE /* p2p_ext.c includes this file after Python.h, which defines it */
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <math.h>
#include <stdint.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/uio.h>
#include <time.h>

#define ERR_CLOSED (-100001)   /* the peer closed the stream */
#define ERR_TIMEOUT (-100002)  /* the deadline passed (or SO_RCVTIMEO/SO_SNDTIMEO ran out) */
#define ERR_TOO_LONG (-100003) /* a length over the caller's limit: *len_out holds it */
#define ERR_LARGE (-100004)    /* a message longer than the staging buffer: *len_out holds it (recv_large) */
#define ERR_OTHER (-100005)    /* not the common case: the caller's own path handles the message (serve, take) */
#define ERR_ARGS (-100006)     /* the caller's buffers do not fit the message asked for: nothing was read */

int64_t mm_p2p_abi(void) { return 8; }

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts); /* time.monotonic()'s clock on Linux */
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

static double thread_cpu_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* The spin before a blocking receive, per pair (p2p_socket.py's _spin: int64[6]). A spin pays when the message
   comes while it runs and nobody else wanted the CPU. One that runs out (a long wait: the peer computes), or
   during which this thread lost its CPU (the peer, or anyone, needed it: spinning then only delays them), is
   followed by receives that block at once, twice as many each time it does not pay (up to SPIN_BACKOFF_MAX),
   one again as soon as it does. */
typedef struct {
    int64_t max_ns;    /* the longest spin; 0: never spin */
    int64_t skip;      /* receives left that block without spinning */
    int64_t backoff;   /* the skip after the next spin that does not pay */
    int64_t caught;    /* spins that caught their message */
    int64_t missed;    /* spins that ran out */
    int64_t preempted; /* spins during which this thread was off its CPU */
    int64_t preempt_ns; /* off its CPU longer than this (and a quarter of the spin): preempted */
} spin_t;
#define SPIN_BACKOFF_MAX 1024
#define NOT_CAUGHT (-2)

/* recv without blocking until a message comes or the spin runs out (at most left seconds): bytes, 0 (closed),
   -1 (errno), or NOT_CAUGHT: block now. */
static ssize_t spin_recv(int fd, uint8_t *buf, int64_t room, double left, spin_t *spin) {
    if (spin == NULL || spin->max_ns <= 0) return NOT_CAUGHT;
    if (spin->skip > 0) {
        spin->skip--;
        return NOT_CAUGHT;
    }
    double start = now_s(), cpu = thread_cpu_s(), until = start + fmin(spin->max_ns * 1e-9, left);
    ssize_t got;
    int err = 0;
    do {
        got = recv(fd, buf, (size_t)room, MSG_DONTWAIT);
        if (got >= 0) break;
        err = errno;
        if (err != EAGAIN && err != EWOULDBLOCK && err != EINTR) break;
        got = NOT_CAUGHT;
    } while (now_s() < until);
    double wall = now_s() - start, off_cpu = wall - (thread_cpu_s() - cpu);
    int preempted = off_cpu > spin->preempt_ns * 1e-9 && off_cpu > wall / 4;
    spin->preempted += preempted;
    spin->missed += got == NOT_CAUGHT;
    if (got == NOT_CAUGHT || preempted) {
        spin->skip = spin->backoff;
        spin->backoff = spin->backoff * 2 > SPIN_BACKOFF_MAX ? SPIN_BACKOFF_MAX : spin->backoff * 2;
    } else if (got >= 0) { /* a message (or the peer's close) caught; an error is neither */
        spin->caught++;
        spin->backoff = 1;
    }
    if (got == -1) errno = err;
    return got;
}

/* Send every byte of iov[0:n] (advancing over partial writes); 0 or a negative code. */
static int64_t send_all(int fd, struct iovec *iov, int n) {
    while (n > 0) {
        struct msghdr msg = {0};
        msg.msg_iov = iov;
        msg.msg_iovlen = (size_t)n;
        ssize_t sent = sendmsg(fd, &msg, MSG_NOSIGNAL);
        if (sent < 0) {
            if (errno == EINTR) continue;
            return (errno == EAGAIN || errno == EWOULDBLOCK) ? ERR_TIMEOUT : -(int64_t)errno;
        }
        while (n > 0 && (size_t)sent >= iov->iov_len) {
            sent -= (ssize_t)iov->iov_len;
            iov++;
            n--;
        }
        if (n > 0) {
            iov->iov_base = (char *)iov->iov_base + sent;
            iov->iov_len -= (size_t)sent;
        }
    }
    return 0;
}

/* A dispatch request: head = the header's int64[8] (kind first: 4 inline, else the body is a message of its
   own), ids [rows*k] int32 or int64 (ids_size 4 or 8: narrowed to int32), w [rows*k] float32, x the rows'
   x_bytes. scratch holds 8 + 64 + 8 + rows*k*8 bytes (the caller sizes it). */
int64_t mm_send_request(int fd, uint8_t *scratch, const int64_t *head, const void *ids, int32_t ids_size,
                        const float *w, const void *x, int64_t x_bytes) {
    int64_t n = head[3] * head[4], meta = n * 8, kind = head[0];
    uint8_t *p = scratch;
    int64_t first = kind == 4 ? 64 + meta + x_bytes : 64;
    memcpy(p, &first, 8);
    memcpy(p + 8, head, 64);
    p += 72;
    if (kind != 4) {
        int64_t body = meta + x_bytes;
        memcpy(p, &body, 8);
        p += 8;
    }
    int32_t *out = (int32_t *)p;
    if (ids_size == 8) {
        const int64_t *src = (const int64_t *)ids;
        for (int64_t i = 0; i < n; i++) out[i] = (int32_t)src[i];
    } else {
        memcpy(out, ids, (size_t)n * 4);
    }
    memcpy(p + n * 4, w, (size_t)n * 4);
    p += meta;
    struct iovec iov[2] = {{scratch, (size_t)(p - scratch)}, {(void *)x, (size_t)x_bytes}};
    return send_all(fd, iov, x_bytes > 0 ? 2 : 1);
}

/* A reply: prefix = int64[5] (msg_id, status, receive_ns, compute_ns, send_ns), then y's bytes. */
int64_t mm_send_reply(int fd, const int64_t *prefix, const void *y, int64_t y_bytes) {
    int64_t head[6];
    head[0] = 40 + y_bytes;
    memcpy(head + 1, prefix, 40);
    struct iovec iov[2] = {{head, 48}, {(void *)y, (size_t)y_bytes}};
    return send_all(fd, iov, y_bytes > 0 ? 2 : 1);
}

/* One recv into buf[0:room] under the deadline (after a spin: spin_recv), keeping SO_RCVTIMEO within
   [left, left * slack] (reset only when it is off, as p2p_socket._recv_some does: *rcvtimeo is what it is set
   to). Bytes read or a code. */
static int64_t recv_some(int fd, uint8_t *buf, int64_t room, double deadline, double *rcvtimeo, double slack,
                         spin_t *spin) {
    double left = deadline - now_s();
    if (left <= 0) return ERR_TIMEOUT;
    ssize_t got = spin_recv(fd, buf, room, left, spin); /* once per receive: an EINTR below does not spin again */
    if (got > 0) return got;
    if (got == 0) return ERR_CLOSED;
    if (got == -1 && errno != EINTR) return -(int64_t)errno;
    for (;;) {
        left = deadline - now_s();
        if (left <= 0) return ERR_TIMEOUT;
        if (!(left <= *rcvtimeo && *rcvtimeo <= left * slack)) {
            double t = left * (1 + slack) / 2;
            if (t < 0.001) t = 0.001;
            struct timeval tv = {(time_t)t, (suseconds_t)((t - (double)(time_t)t) * 1e6)};
            if (setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv) != 0) return -(int64_t)errno;
            *rcvtimeo = t;
        }
        got = recv(fd, buf, (size_t)room, 0);
        if (got > 0) return got;
        if (got == 0) return ERR_CLOSED;
        if (errno == EINTR) continue;
        return (errno == EAGAIN || errno == EWOULDBLOCK) ? ERR_TIMEOUT : -(int64_t)errno;
    }
}

/* Receive until staging[state[0]:state[1]] holds need bytes (moving them to the front when they would not
   fit: what was handed out before is done with). */
static int64_t fill(int fd, uint8_t *staging, int64_t cap, int64_t *state, int64_t need, double deadline,
                    double *rcvtimeo, double slack, spin_t *spin) {
    if (state[0] + need > cap) {
        int64_t held = state[1] - state[0];
        memmove(staging, staging + state[0], (size_t)held);
        state[0] = 0;
        state[1] = held;
    }
    while (state[1] - state[0] < need) {
        int64_t got = recv_some(fd, staging + state[1], cap - state[1], deadline, rcvtimeo, slack, spin);
        if (got < 0) return got;
        state[1] += got;
    }
    return 0;
}

/* The next message of at most limit bytes: its offset in staging (its length in *len_out), valid until the
   next receive; state = {start, end} of the bytes received and not handed out. */
static int64_t recv_message(int fd, uint8_t *staging, int64_t cap, int64_t *state, int64_t limit, double deadline,
                            double *rcvtimeo, double slack, int64_t *len_out, spin_t *spin) {
    int64_t rc;
    if (state[1] - state[0] < 8 && (rc = fill(fd, staging, cap, state, 8, deadline, rcvtimeo, slack, spin)) < 0)
        return rc;
    int64_t n;
    memcpy(&n, staging + state[0], 8);
    *len_out = n;
    if (n < 0 || n > limit) return ERR_TOO_LONG;
    if (state[0] + 8 + n > state[1]) {
        if (8 + n > cap) return ERR_LARGE;
        if ((rc = fill(fd, staging, cap, state, 8 + n, deadline, rcvtimeo, slack, spin)) < 0) return rc;
    }
    int64_t begin = state[0] + 8;
    state[0] = begin + n;
    return begin;
}

/* After ERR_LARGE: the n-byte message into out (a buffer of its own), the bytes staged first. */
int64_t mm_recv_large(int fd, uint8_t *staging, int64_t *state, uint8_t *out, int64_t n, double deadline,
                      double *rcvtimeo, double slack) {
    int64_t held = state[1] - state[0] - 8;
    memcpy(out, staging + state[0] + 8, (size_t)held);
    state[0] = state[1] = 0;
    while (held < n) {
        int64_t got = recv_some(fd, out + held, n - held, deadline, rcvtimeo, slack, NULL);
        if (got < 0) return got;
        held += got;
    }
    return 0;
}

/* The expert node's checks of one message's ids [n] int32 and weights [n] float32: every id is -1 or an
   expert hosted here (hosted [n_experts] bool), every weight finite. Returns the routed count (ids >= 0), -1
   for a bad id, -2 for a weight that is not finite. Nothing is counted here (mm_reply counts once sent). */
int64_t mm_check_rows(const int32_t *ids, const float *w, int64_t n, const uint8_t *hosted, int64_t n_experts) {
    /* memcpy loads: a frame placed after one whose length is not a multiple of 4 leaves these unaligned
       (only a malformed frame does: valid lengths are multiples of 8), and a plain load would then be UB */
    int64_t routed = 0;
    for (int64_t i = 0; i < n; i++) {
        int32_t e;
        memcpy(&e, ids + i, sizeof e);
        if (e == -1) continue;
        if (e < 0 || e >= n_experts || !hosted[e]) return -1;
        routed++;
    }
    for (int64_t i = 0; i < n; i++) {
        float v;
        memcpy(&v, w + i, sizeof v);
        if (!isfinite(v)) return -2;
    }
    return routed;
}

/* The expert node's next request, received and checked in one call when it is the common case: an inline
   dispatch frame (kind 4) whose header and rows pass every check of the node's Python path (the layer hosted
   here, a hidden dtype it takes, hidden and k in range, the lengths the header implies, ids hosted or -1,
   finite weights). Then it returns the routed count (>= 0); nothing is counted here: the reply counts the ids
   once it is sent (mm_reply), so a request the node then fails to compute or answer is never counted.
   Anything else (a ping, a bye, a two-message request, any failed check) returns ERR_OTHER with the frame
   handed out all the same, for the Python path to handle or to name what is wrong.
   out: int64[2] = the frame's offset in staging and its length.
   limits: int64[5] = hidden, max k, max body bytes, inline bytes, n_experts.
   itemsize: int64[16] by dtype code (0: a dtype the node does not take).
   hosted: per layer id (n_layers of them), a bool[n_experts] mask (NULL: none here). */
static int64_t serve_next(int fd, uint8_t *staging, int64_t cap, int64_t *state, int64_t limit, double deadline,
                          double *rcvtimeo, double slack, spin_t *spin, int64_t *out, const int64_t *limits,
                          const int64_t *itemsize, const uint8_t *const *hosted, int64_t n_layers) {
    int64_t len = 0;
    int64_t off = recv_message(fd, staging, cap, state, limit, deadline, rcvtimeo, slack, &len, spin);
    out[1] = len;
    if (off < 0) return off;
    out[0] = off;
    if (len < 64) return ERR_OTHER;
    int64_t h[8];
    memcpy(h, staging + off, 64);
    int64_t kind = h[0], layer = h[2], rows = h[3], k = h[4], code = h[6], hidden = h[7];
    if (kind != 4 || layer < 0 || layer >= n_layers || hosted[layer] == NULL || code < 0 || code >= 16 ||
        itemsize[code] == 0 || hidden != limits[0] || k < 1 || k > limits[1] || rows < 1)
        return ERR_OTHER;
    /* rows and k are bounded by the frame's own length before anything is multiplied: no overflow */
    if (rows > len || rows * k > len) return ERR_OTHER;
    int64_t body = rows * k * 8 + rows * hidden * itemsize[code];
    if (body > limits[2] || body > limits[3] || len != 64 + body) return ERR_OTHER;
    int64_t n = rows * k;
    const uint8_t *meta = staging + off + 64;
    int64_t routed = mm_check_rows((const int32_t *)meta, (const float *)(meta + 4 * n), n, hosted[layer], limits[4]);
    return routed < 0 ? ERR_OTHER : routed;
}

/* How many leading rows of ids [rows, k] (int32 or int64: size 4 or 8) to send: up to the last row with an
   id >= 0 (the attention node's trim; remote_backend.rows_with_work in numpy). */
int64_t mm_rows_with_work(const void *ids, int32_t size, int64_t rows, int64_t k) {
    for (int64_t r = rows - 1; r >= 0; r--)
        for (int64_t j = 0; j < k; j++)
            if (size == 8 ? ((const int64_t *)ids)[r * k + j] >= 0 : ((const int32_t *)ids)[r * k + j] >= 0)
                return r + 1;
    return 0;
}

/* ---- one-pointer entry points -------------------------------------------------------------------------
   A ctypes call costs about a microsecond per argument converted (measured here: 3.5 us for four), more than
   the system call it wraps. So the per-message calls take ONE pointer, to a block of 8-byte fields the Python
   side keeps per pair: most fields are written once (the descriptor, the buffers' addresses), the rest with
   one struct.pack_into per message. The layouts are p2p_socket.py's _RECV_FIXED, _SERVE_TABLES, _SEND and
   _REPLY. */
typedef struct {
    int64_t limit;
    double deadline;
    int64_t fd;
    uint8_t *staging;
    int64_t cap;
    int64_t *state;
    double *rcvtimeo;
    double slack;
    int64_t *len_out;
    spin_t *spin;
} recv_args;

typedef struct {
    recv_args r;
    int64_t *out;
    const int64_t *limits;
    const int64_t *itemsize;
    const uint8_t *const *hosted;
    int64_t n_layers;
} serve_args;

typedef struct {
    int64_t fd;
    uint8_t *scratch;
    const void *ids;
    int64_t ids_size;
    const float *w;
    const void *x;
    int64_t x_bytes;
    int64_t head[8];
} send_args;

/* A reply, and the request's routed ids counted once it is sent: ids [n] int32 (the request's, checked already:
   each -1 or hosted), counts int64 [n_experts] (NULL, or n 0: nothing to count). */
typedef struct {
    int64_t fd;
    const void *y;
    int64_t y_bytes;
    int64_t prefix[5];
    const int32_t *ids; /* then what to count once sent */
    int64_t n;
    int64_t *counts;
    int64_t n_experts;
} reply_args;

/* The attention node's reply, taken in one call: r's next message (at most r->limit bytes: the reply due),
   its 40-byte prefix (msg_id, status, receive_ns, compute_ns, send_ns) copied to prefix_out[5] and its rows
   to out[0:out_bytes] (a tensor the caller made for them), so no Python touches the staged bytes. 0 when it
   was exactly r->limit bytes; ERR_OTHER for a shorter one (*r->len_out holds its length, for the caller's
   error: the frames are out of step); else mm_recv's codes. The caller checks the prefix's id and status. */
typedef struct {
    const recv_args *r;
    int64_t *prefix_out;
    void *out;
    int64_t out_bytes;
} take_args;

int64_t mm_take(const take_args *a) {
    const recv_args *r = a->r;
    if (r->limit < 40 || a->out_bytes != r->limit - 40) return ERR_ARGS; /* before a byte is read: the stream is intact */
    int64_t off = recv_message((int)r->fd, r->staging, r->cap, r->state, r->limit, r->deadline, r->rcvtimeo,
                               r->slack, r->len_out, r->spin);
    if (off < 0) return off;
    int64_t n = *r->len_out;
    if (n != r->limit || n < 40 || a->out_bytes != n - 40) return ERR_OTHER;
    memcpy(a->prefix_out, r->staging + off, 40);
    memcpy(a->out, r->staging + off + 40, (size_t)a->out_bytes);
    return 0;
}

int64_t mm_recv(const recv_args *a) {
    return recv_message((int)a->fd, a->staging, a->cap, a->state, a->limit, a->deadline, a->rcvtimeo, a->slack,
                        a->len_out, a->spin);
}

int64_t mm_serve(const serve_args *a) {
    const recv_args *r = &a->r;
    return serve_next((int)r->fd, r->staging, r->cap, r->state, r->limit, r->deadline, r->rcvtimeo, r->slack, r->spin,
                      a->out, a->limits, a->itemsize, a->hosted, a->n_layers);
}

int64_t mm_send(const send_args *a) {
    return mm_send_request((int)a->fd, a->scratch, a->head, a->ids, (int32_t)a->ids_size, a->w, a->x, a->x_bytes);
}

/* Adds ids[0:n]'s routed ones (0 <= id < n_experts; -1 and anything else are not counted) to counts. */
static void count_ids(const int32_t *ids, int64_t n, int64_t *counts, int64_t n_experts) {
    for (int64_t i = 0; i < n; i++) {
        int32_t e;
        memcpy(&e, ids + i, sizeof e); /* maybe unaligned: see mm_check_rows */
        if (e >= 0 && e < n_experts) counts[e]++;
    }
}

int64_t mm_reply(const reply_args *a) {
    int64_t rc = mm_send_reply((int)a->fd, a->prefix, a->y, a->y_bytes);
    if (rc == 0 && a->counts != NULL && a->ids != NULL) count_ids(a->ids, a->n, a->counts, a->n_experts);
    return rc;
}
