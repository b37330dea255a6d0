/*
 * kvbench: an epoll load generator for kvtwist and Redis.
 *
 * One thread drives many non-blocking connections. Each active connection
 * keeps `depth` requests in flight: whenever replies arrive, it sends as many
 * new requests as it got replies, in one write. Keys are drawn uniformly from
 * [0, keyspace); `reads` percent of requests are gets, the rest are split
 * evenly between put-if-absent and delete, so the store stays about half full.
 *
 * It speaks the kvtwist line protocol (`get K`, `put K V`, `del K`) or Redis
 * inline commands (`GET K`, `SET K V NX`, `DEL K`) with RESP replies, so both
 * servers run exactly the same workload.
 *
 * Optionally it first opens `idle` extra connections, makes one request on
 * each (so the server has really accepted them) and then leaves them silent
 * for the whole run. A child process holds each server's idle connections:
 * the open-files limit is per process, and several servers' 10,000 idle
 * connections would not fit under one.
 *
 * Given several servers (`--port 5000,5001`), it loads them in turns: each
 * has its own connections, and only one server's are sending at a time.
 * After a warm-up turn each, the servers take measured turns of `turn`
 * seconds, always in the same order (A B C A B C ...), until each has had
 * `duration` seconds. A turn ends once its last reply is in. So every
 * server is measured across the same stretch of time, and a machine that
 * slows down for a second slows them all alike. Every measured turn of
 * every server begins right after another server's: the switch (the
 * other's last replies drained, this one's pipelines refilled) costs each
 * the same. An order that gave some servers two turns in a row (forwards
 * then backwards: A B C C B A) spared those servers half their switches,
 * and served them about 2% more than the one in the middle.
 *
 * The result is one JSON line per server on stdout: requests/s over its
 * measured turns, latency percentiles, and the latency histogram.
 *
 * Build: gcc -O2 -Wall -Wextra kvbench.c -o kvbench
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define RBUF_SIZE 65536
#define MAX_REQUEST 64
#define MAX_EVENTS 1024
#define MAX_PENDING_CONNECTS 256

/* Latency histogram: log-linear buckets in nanoseconds, relative error < 1/64. */
#define SUB_BITS 7
#define SUB_COUNT (1 << SUB_BITS)
#define HALF_SUB (SUB_COUNT / 2)
#define NBUCKETS (SUB_COUNT + 58 * HALF_SUB)

enum proto { PROTO_KV, PROTO_REDIS };
enum state { ST_CONNECTING, ST_PROBING, ST_IDLE, ST_ACTIVE };

#define MAX_TARGETS 16

struct options {
    const char *host;
    int ntargets;
    const char *ports[MAX_TARGETS];
    enum proto protos[MAX_TARGETS];
    int connections;
    int depth;
    int64_t keyspace;
    int reads;
    double duration;
    double warmup;
    double turn;
    int idle;
    int fill;
    uint64_t seed;
};

struct target;

struct conn {
    struct target *t;
    int fd;
    enum state state;
    int outstanding;
    uint64_t rng;
    int64_t next_fill_key;
    int64_t fill_end;
    uint64_t *sent_ns; /* ring of send times, one per request in flight */
    int ring_head;
    char *rbuf;
    size_t rlen;
    size_t rcap;
    char *wbuf;
    size_t wlen;
    size_t woff;
};

struct stats {
    uint64_t replies;
    uint64_t hist[NBUCKETS];
};

/* One server under load, with its own connections and figures. */
struct target {
    const char *port;
    enum proto proto;
    struct conn *conns;    /* the active connections */
    int in_flight;         /* their requests not yet answered */
    int sending;           /* its turn: replies are followed by new requests */
    int measuring;         /* replies count in window */
    struct stats window;   /* replies inside measured turns */
    uint64_t measured_ns;  /* how long its measured turns took */
    long turns;            /* measured turns */
    long started;          /* measured turns that began with its pipelines refilled, not going on from its own */
    uint64_t total_replies; /* every reply, warm-up and probes included */
    uint64_t total_errors;  /* error replies, warm-up included */
    int busy;              /* with --fill: active connections that still have work */
};

static struct options opt = {
    .host = "127.0.0.1",
    .connections = 50,
    .depth = 1,
    .keyspace = 100000,
    .reads = 80,
    .duration = 5.0,
    .warmup = 1.0,
    .turn = 0.0,
    .idle = 0,
    .fill = 0,
    .seed = 1,
};

static int epfd;
static struct target targets[MAX_TARGETS];

/* The child holding a server's idle connections, until its pipe closes. */
struct holder {
    pid_t pid;
    int hold_fd;
};
static struct holder holders[MAX_TARGETS];
static int nholders;

static void die(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fputs("kvbench: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    exit(1);
}

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static uint64_t next_random(uint64_t *state)
{
    /* xorshift64*: fast, and good enough to pick keys. */
    uint64_t x = *state;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    *state = x;
    return x * 0x2545F4914F6CDD1DULL;
}

static int bucket_of(uint64_t v)
{
    if (v < SUB_COUNT)
        return (int)v;
    int msb = 63 - __builtin_clzll(v);
    int shift = msb - (SUB_BITS - 1);
    return SUB_COUNT + (shift - 1) * HALF_SUB + (int)((v >> shift) - HALF_SUB);
}

/* The largest value that falls in bucket b: percentiles never flatter. */
static uint64_t bucket_upper(int b)
{
    if (b < SUB_COUNT)
        return (uint64_t)b;
    int shift = (b - SUB_COUNT) / HALF_SUB + 1;
    uint64_t mantissa = (uint64_t)((b - SUB_COUNT) % HALF_SUB + HALF_SUB);
    return ((mantissa + 1) << shift) - 1;
}

static double percentile_us(const struct stats *s, double q)
{
    uint64_t count = 0;
    for (int b = 0; b < NBUCKETS; b++)
        count += s->hist[b];
    if (count == 0)
        return 0.0;
    uint64_t rank = (uint64_t)(q * (double)count);
    if (rank >= count)
        rank = count - 1;
    uint64_t seen = 0;
    for (int b = 0; b < NBUCKETS; b++) {
        seen += s->hist[b];
        if (seen > rank)
            return (double)bucket_upper(b) / 1000.0;
    }
    return 0.0;
}

static char *put_int(char *p, int64_t v)
{
    char tmp[24];
    int n = 0;
    uint64_t u = v < 0 ? (uint64_t)0 - (uint64_t)v : (uint64_t)v;
    do {
        tmp[n++] = (char)('0' + u % 10);
        u /= 10;
    } while (u);
    if (v < 0)
        *p++ = '-';
    while (n)
        *p++ = tmp[--n];
    return p;
}

static char *put_str(char *p, const char *s)
{
    size_t n = strlen(s);
    memcpy(p, s, n);
    return p + n;
}

/* Append one request to c->wbuf and remember when it was sent. */
static void add_request(struct conn *c, uint64_t now)
{
    char *p = c->wbuf + c->wlen;
    int redis = c->t->proto == PROTO_REDIS;
    const char *eol = redis ? "\r\n" : "\n";
    int64_t key;
    uint64_t r = next_random(&c->rng);

    if (c->state == ST_PROBING) {
        p = put_str(p, redis ? "GET 0" : "get 0");
    } else if (opt.fill) {
        key = c->next_fill_key++;
        p = put_str(p, redis ? "SET " : "put ");
        p = put_int(p, key);
        *p++ = ' ';
        p = put_int(p, key);
        if (redis)
            p = put_str(p, " NX");
    } else {
        key = (int64_t)((r >> 8) % (uint64_t)opt.keyspace);
        if ((int)(r % 100) < opt.reads) {
            p = put_str(p, redis ? "GET " : "get ");
            p = put_int(p, key);
        } else if ((r >> 7) & 1) {
            p = put_str(p, redis ? "SET " : "put ");
            p = put_int(p, key);
            *p++ = ' ';
            p = put_int(p, (int64_t)(next_random(&c->rng) >> 1));
            if (redis)
                p = put_str(p, " NX");
        } else {
            p = put_str(p, redis ? "DEL " : "del ");
            p = put_int(p, key);
        }
    }
    p = put_str(p, eol);
    c->wlen = (size_t)(p - c->wbuf);
    c->sent_ns[(c->ring_head + c->outstanding) % opt.depth] = now;
    c->outstanding++;
    if (c->state == ST_ACTIVE)
        c->t->in_flight++;
}

static void want_write(struct conn *c, int on)
{
    struct epoll_event ev = {.events = EPOLLIN | (on ? EPOLLOUT : 0), .data.ptr = c};
    if (epoll_ctl(epfd, EPOLL_CTL_MOD, c->fd, &ev) < 0)
        die("epoll_ctl: %s", strerror(errno));
}

static void flush(struct conn *c)
{
    while (c->woff < c->wlen) {
        ssize_t n = write(c->fd, c->wbuf + c->woff, c->wlen - c->woff);
        if (n < 0) {
            if (errno == EAGAIN) {
                /* Keep only unsent bytes, so the buffer never holds more
                 * than the requests in flight. */
                memmove(c->wbuf, c->wbuf + c->woff, c->wlen - c->woff);
                c->wlen -= c->woff;
                c->woff = 0;
                want_write(c, 1);
                return;
            }
            die("write: %s", strerror(errno));
        }
        c->woff += (size_t)n;
    }
    if (c->wlen && c->woff == c->wlen) {
        c->wlen = c->woff = 0;
    }
}

/* How many bytes the first complete reply in buf takes, or 0 if incomplete. */
static size_t reply_length(enum proto proto, const char *buf, size_t len, int *is_error)
{
    const char *nl = memchr(buf, '\n', len);
    if (!nl)
        return 0;
    size_t line = (size_t)(nl - buf) + 1;
    if (proto == PROTO_KV) {
        *is_error = line >= 6 && memcmp(buf, "Error:", 6) == 0;
        return line;
    }
    *is_error = buf[0] == '-';
    if (buf[0] != '$')
        return line;
    long n = strtol(buf + 1, NULL, 10);
    if (n < 0)
        return line;
    size_t need = line + (size_t)n + 2;
    return len >= need ? need : 0;
}

static int conn_can_send_more(const struct conn *c)
{
    if (c->state != ST_ACTIVE || !c->t->sending)
        return 0;
    if (opt.fill)
        return c->next_fill_key < c->fill_end;
    return 1;
}

static void on_readable(struct conn *c)
{
    struct target *t = c->t;
    for (;;) {
        ssize_t n = read(c->fd, c->rbuf + c->rlen, c->rcap - c->rlen);
        if (n == 0)
            die("server closed a connection");
        if (n < 0) {
            if (errno == EAGAIN)
                break;
            die("read: %s", strerror(errno));
        }
        c->rlen += (size_t)n;

        uint64_t now = now_ns();
        size_t off = 0;
        int replies = 0;
        for (;;) {
            int is_error = 0;
            size_t used = reply_length(t->proto, c->rbuf + off, c->rlen - off, &is_error);
            if (!used)
                break;
            if (c->outstanding == 0)
                die("reply without a request");
            off += used;
            replies++;
            t->total_replies++;
            uint64_t sent = c->sent_ns[c->ring_head];
            c->ring_head = (c->ring_head + 1) % opt.depth;
            c->outstanding--;
            if (is_error)
                t->total_errors++;
            if (c->state == ST_ACTIVE) {
                t->in_flight--;
                if (t->measuring) {
                    t->window.replies++;
                    t->window.hist[bucket_of(now - sent)]++;
                }
            }
        }
        memmove(c->rbuf, c->rbuf + off, c->rlen - off);
        c->rlen -= off;
        if (c->rlen == c->rcap)
            die("reply too long");

        if (c->state == ST_PROBING && c->outstanding == 0) {
            c->state = ST_IDLE;
            continue;
        }
        while (replies-- > 0 && conn_can_send_more(c))
            add_request(c, now);
        flush(c);
        if (c->state == ST_ACTIVE && opt.fill && c->outstanding == 0 &&
            c->next_fill_key >= c->fill_end) {
            c->state = ST_IDLE;
            t->busy--;
        }
    }
}

static struct addrinfo *resolve(const char *port)
{
    struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM};
    struct addrinfo *ai;
    int rc = getaddrinfo(opt.host, port, &hints, &ai);
    if (rc)
        die("cannot resolve %s:%s: %s", opt.host, port, gai_strerror(rc));
    return ai;
}

static void start_connect(struct conn *c, const struct addrinfo *ai)
{
    c->fd = socket(ai->ai_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (c->fd < 0)
        die("socket: %s (raise the open-files limit?)", strerror(errno));
    int one = 1;
    setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (connect(c->fd, ai->ai_addr, ai->ai_addrlen) < 0 && errno != EINPROGRESS)
        die("connect: %s", strerror(errno));
    c->state = ST_CONNECTING;
    struct epoll_event ev = {.events = EPOLLOUT, .data.ptr = c};
    if (epoll_ctl(epfd, EPOLL_CTL_ADD, c->fd, &ev) < 0)
        die("epoll_ctl: %s", strerror(errno));
}

static void on_connected(struct conn *c, enum state next)
{
    int err = 0;
    socklen_t len = sizeof err;
    getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len);
    if (err)
        die("connect: %s", strerror(err));
    c->state = next;
    want_write(c, 0);
}

static void init_conn(struct conn *c, struct target *t, int index, int depth, size_t rcap)
{
    memset(c, 0, sizeof *c);
    c->t = t;
    c->rng = opt.seed * 0x9E3779B97F4A7C15ULL + (uint64_t)index + 1;
    c->sent_ns = calloc((size_t)depth, sizeof *c->sent_ns);
    c->rcap = rcap;
    c->rbuf = malloc(rcap);
    c->wbuf = malloc((size_t)depth * MAX_REQUEST);
    if (!c->sent_ns || !c->rbuf || !c->wbuf)
        die("out of memory");
}

static void dispatch(struct epoll_event *ev, enum state after_connect)
{
    struct conn *c = ev->data.ptr;
    if (c->state == ST_CONNECTING) {
        on_connected(c, after_connect);
        if (c->state == ST_PROBING) {
            add_request(c, now_ns());
            flush(c);
        }
        return;
    }
    if (ev->events & (EPOLLIN | EPOLLERR | EPOLLHUP))
        on_readable(c);
    if (ev->events & EPOLLOUT) {
        want_write(c, 0);
        flush(c);
    }
}

/* Open the idle connections a bounded number at a time, so the server's
 * listen backlog never overflows (an overflow costs a one-second SYN retry). */
static struct conn *open_idle(struct target *t, const struct addrinfo *ai)
{
    struct conn *idle = calloc((size_t)(opt.idle ? opt.idle : 1), sizeof *idle);
    struct epoll_event events[MAX_EVENTS];
    int started = 0, done = 0;
    if (!idle)
        die("out of memory");
    while (done < opt.idle) {
        while (started < opt.idle && started - done < MAX_PENDING_CONNECTS) {
            struct conn *c = &idle[started];
            /* Idle connections need only room for their one probe. */
            init_conn(c, t, -1 - started, opt.depth, 256);
            start_connect(c, ai);
            started++;
        }
        int n = epoll_wait(epfd, events, MAX_EVENTS, 10000);
        if (n == 0)
            die("timed out opening idle connections (%d of %d ready)", done, opt.idle);
        for (int i = 0; i < n; i++) {
            struct conn *c = events[i].data.ptr;
            enum state before = c->state;
            dispatch(&events[i], ST_PROBING);
            if (before == ST_PROBING && c->state == ST_IDLE)
                done++;
        }
    }
    return idle;
}

/* Room for every connection: raise the soft limit, and the hard one if
 * allowed; a run that cannot have them says so rather than failing midway. */
static void set_nofile_limit(long needed)
{
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) != 0 || rl.rlim_cur >= (rlim_t)needed)
        return;
    if (rl.rlim_max < (rlim_t)needed) {
        struct rlimit more = {.rlim_cur = (rlim_t)needed, .rlim_max = (rlim_t)needed};
        if (setrlimit(RLIMIT_NOFILE, &more) == 0)
            return;
        die("needs %ld open files, and the limit is %llu (raise ulimit -Hn)", needed,
            (unsigned long long)rl.rlim_max);
    }
    rl.rlim_cur = (rlim_t)needed;
    setrlimit(RLIMIT_NOFILE, &rl);
}

/*
 * Open a target's idle connections in a child process, which holds them
 * until kvbench is done. The child reports how many replies its probes
 * got, as they count in the server's total.
 */
static void hold_idle(struct target *t, const struct addrinfo *ai)
{
    int ready[2], hold[2];
    if (pipe2(ready, O_CLOEXEC) < 0 || pipe2(hold, O_CLOEXEC) < 0)
        die("pipe: %s", strerror(errno));
    fflush(stdout);
    pid_t pid = fork();
    if (pid < 0)
        die("fork: %s", strerror(errno));
    if (pid == 0) {
        close(ready[0]);
        close(hold[1]);
        /* Only kvbench itself may keep an older holder's pipe open. */
        for (int i = 0; i < nholders; i++)
            close(holders[i].hold_fd);
        close(epfd);
        epfd = epoll_create1(EPOLL_CLOEXEC);
        if (epfd < 0)
            die("epoll_create1: %s", strerror(errno));
        set_nofile_limit((long)opt.idle + 64);
        open_idle(t, ai);
        uint64_t probes = t->total_replies;
        if (write(ready[1], &probes, sizeof probes) != (ssize_t)sizeof probes)
            _exit(1);
        char byte;
        while (read(hold[0], &byte, 1) < 0 && errno == EINTR)
            ;
        _exit(0);
    }
    close(ready[1]);
    close(hold[0]);
    uint64_t probes;
    ssize_t n;
    do
        n = read(ready[0], &probes, sizeof probes);
    while (n < 0 && errno == EINTR);
    if (n != (ssize_t)sizeof probes)
        die("port %s: could not open the idle connections", t->port);
    close(ready[0]);
    t->total_replies += probes;
    holders[nholders++] = (struct holder){.pid = pid, .hold_fd = hold[1]};
}

/* Let the holders go, and wait until they have closed their connections. */
static void release_idle(void)
{
    for (int i = 0; i < nholders; i++) {
        close(holders[i].hold_fd);
        waitpid(holders[i].pid, NULL, 0);
    }
    nholders = 0;
}

static void usage(int code)
{
    fprintf(code ? stderr : stdout,
            "usage: kvbench [options]\n"
            "  -H, --host HOST         server host (127.0.0.1)\n"
            "  -p, --port PORT[,PORT]  server port, or several servers' to load in turns (5000)\n"
            "  -P, --proto kv|redis[,...]  protocol, one for all or one per port (kv)\n"
            "  -c, --connections N     active connections per server (50)\n"
            "  -d, --depth N           requests in flight per connection (1)\n"
            "  -k, --keyspace N        keys are drawn from [0, N) (100000)\n"
            "  -r, --reads PCT         percent of gets; the rest is put/del 50:50 (80)\n"
            "  -t, --duration SECONDS  measured time per server (5)\n"
            "  -w, --warmup SECONDS    unmeasured time before it, per server (1)\n"
            "  -T, --turn SECONDS      measure in turns of this long (0: one turn of --duration)\n"
            "  -i, --idle N            extra connections per server held open and silent (0)\n"
            "  -f, --fill              put every key of the keyspace once, then stop (one server)\n"
            "  -s, --seed N            random seed (1)\n");
    exit(code);
}

static long parse_long(const char *s, const char *what, long lo, long hi)
{
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno || *end || end == s || v < lo || v > hi)
        die("bad %s: %s", what, s);
    return v;
}

static double parse_seconds(const char *s, const char *what)
{
    char *end;
    double v = strtod(s, &end);
    if (*end || end == s || v < 0 || v > 86400)
        die("bad %s: %s", what, s);
    return v;
}

/* Split a comma-separated list in place; returns how many items. */
static int split_list(char *s, const char **items, const char *what)
{
    int n = 0;
    for (char *item = strtok(s, ","); item; item = strtok(NULL, ",")) {
        if (n == MAX_TARGETS)
            die("at most %d %s", MAX_TARGETS, what);
        items[n++] = item;
    }
    if (n == 0)
        die("no %s given", what);
    return n;
}

static void parse_args(int argc, char **argv)
{
    static const struct option longopts[] = {
        {"host", required_argument, 0, 'H'},     {"port", required_argument, 0, 'p'},
        {"proto", required_argument, 0, 'P'},    {"connections", required_argument, 0, 'c'},
        {"depth", required_argument, 0, 'd'},    {"keyspace", required_argument, 0, 'k'},
        {"reads", required_argument, 0, 'r'},    {"duration", required_argument, 0, 't'},
        {"warmup", required_argument, 0, 'w'},   {"turn", required_argument, 0, 'T'},
        {"idle", required_argument, 0, 'i'},     {"fill", no_argument, 0, 'f'},
        {"seed", required_argument, 0, 's'},     {"help", no_argument, 0, 'h'},
        {0, 0, 0, 0},
    };
    const char *protos[MAX_TARGETS] = {"kv"};
    int nprotos = 1;
    opt.ports[0] = "5000";
    opt.ntargets = 1;
    int ch;
    while ((ch = getopt_long(argc, argv, "H:p:P:c:d:k:r:t:w:T:i:fs:h", longopts, NULL)) != -1) {
        switch (ch) {
        case 'H': opt.host = optarg; break;
        case 'p': opt.ntargets = split_list(optarg, opt.ports, "ports"); break;
        case 'P': nprotos = split_list(optarg, protos, "protocols"); break;
        case 'c': opt.connections = (int)parse_long(optarg, "connections", 1, 100000); break;
        case 'd': opt.depth = (int)parse_long(optarg, "depth", 1, 1000); break;
        case 'k': opt.keyspace = parse_long(optarg, "keyspace", 1, 1L << 40); break;
        case 'r': opt.reads = (int)parse_long(optarg, "reads", 0, 100); break;
        case 't': opt.duration = parse_seconds(optarg, "duration"); break;
        case 'w': opt.warmup = parse_seconds(optarg, "warmup"); break;
        case 'T': opt.turn = parse_seconds(optarg, "turn"); break;
        case 'i': opt.idle = (int)parse_long(optarg, "idle", 0, 1000000); break;
        case 'f': opt.fill = 1; break;
        case 's': opt.seed = (uint64_t)parse_long(optarg, "seed", 0, 1L << 62); break;
        case 'h': usage(0); break;
        default: usage(2);
        }
    }
    if (optind != argc)
        usage(2);
    if (nprotos != 1 && nprotos != opt.ntargets)
        die("%d protocols for %d ports: give one for all, or one per port", nprotos, opt.ntargets);
    if (opt.fill && opt.ntargets > 1)
        die("--fill fills one server at a time");
    for (int i = 0; i < opt.ntargets; i++) {
        const char *name = protos[nprotos == 1 ? 0 : i];
        if (strcmp(name, "kv") == 0)
            opt.protos[i] = PROTO_KV;
        else if (strcmp(name, "redis") == 0)
            opt.protos[i] = PROTO_REDIS;
        else
            die("bad protocol: %s (kv or redis)", name);
    }
}

static void print_result(const struct target *t)
{
    const char *proto = t->proto == PROTO_KV ? "kv" : "redis";
    const struct stats *w = &t->window;
    double elapsed = (double)t->measured_ns / 1e9;
    printf("{\"port\": \"%s\", \"proto\": \"%s\", \"connections\": %d, \"idle\": %d, \"depth\": %d, "
           "\"keyspace\": %lld, \"reads\": %d, \"fill\": %s, \"seconds\": %.6f, "
           "\"requests\": %llu, \"total_requests\": %llu, \"errors\": %llu, "
           "\"turns\": %ld, \"turns_started\": %ld, "
           "\"rps\": %.1f, \"p50_us\": %.1f, \"p99_us\": %.1f, \"p999_us\": %.1f, "
           "\"hist_us\": [",
           t->port, proto, opt.connections, opt.idle, opt.depth, (long long)opt.keyspace, opt.reads,
           opt.fill ? "true" : "false", elapsed, (unsigned long long)w->replies,
           (unsigned long long)t->total_replies, (unsigned long long)t->total_errors,
           t->turns, t->started, elapsed > 0 ? (double)w->replies / elapsed : 0.0, percentile_us(w, 0.50),
           percentile_us(w, 0.99), percentile_us(w, 0.999));
    const char *sep = "";
    for (int b = 0; b < NBUCKETS; b++) {
        if (w->hist[b]) {
            printf("%s[%.3f, %llu]", sep, (double)bucket_upper(b) / 1000.0,
                   (unsigned long long)w->hist[b]);
            sep = ", ";
        }
    }
    printf("]}\n");
    fflush(stdout);
}

/* Handle events until `until` (or until `done` says so), returning the time. */
static uint64_t run_until(uint64_t until, int (*done)(const struct target *), const struct target *t)
{
    struct epoll_event events[MAX_EVENTS];
    uint64_t now = now_ns();
    while (now < until && !(done && done(t))) {
        uint64_t left_ms = (until - now) / 1000000u + 1;
        int n = epoll_wait(epfd, events, MAX_EVENTS, left_ms < 100 ? (int)left_ms : 100);
        if (n < 0 && errno != EINTR)
            die("epoll_wait: %s", strerror(errno));
        for (int i = 0; i < n; i++)
            dispatch(&events[i], ST_ACTIVE);
        now = now_ns();
    }
    return now;
}

static int drained(const struct target *t) { return t->in_flight == 0; }
static int filled(const struct target *t) { return t->busy == 0; }

/* Start a target's turn: every active connection fills up to its depth. */
static void start_sending(struct target *t, uint64_t now)
{
    t->sending = 1;
    for (int i = 0; i < opt.connections; i++) {
        struct conn *c = &t->conns[i];
        while (c->outstanding < opt.depth && conn_can_send_more(c))
            add_request(c, now);
        flush(c);
    }
}

/* End a target's turn: no new requests, and wait for the last replies. */
static uint64_t stop_sending(struct target *t)
{
    t->sending = 0;
    uint64_t now = run_until(now_ns() + 10000000000u, drained, t);
    if (t->in_flight)
        die("port %s: %d replies still missing 10 s after its turn", t->port, t->in_flight);
    return now;
}

/* A turn that began at `began` has ended at `now`: its time counts if it was measured. */
static void count_turn(struct target *t, uint64_t began, uint64_t now)
{
    if (t->measuring)
        t->measured_ns += now - began;
    t->measuring = 0;
}

/*
 * The turns: a warm-up turn per target, then measured turns in the same
 * order, until each target has had opt.duration seconds of them. With one
 * target, its turns follow each other and it just goes on sending.
 */
static void run_turns(void)
{
    int n = opt.ntargets;
    long cycles = opt.turn > 0 ? (long)(opt.duration / opt.turn + 0.5) : 1;
    if (cycles < 1)
        cycles = 1;
    uint64_t turn_ns = (uint64_t)(opt.duration * 1e9 / (double)cycles);
    uint64_t warm_ns = (uint64_t)(opt.warmup * 1e9);
    long total = (warm_ns ? n : 0) + cycles * n;
    struct target *current = NULL;
    uint64_t now = now_ns(), began = now;
    for (long k = 0; k < total; k++) {
        int warm = warm_ns && k < n;
        struct target *t = &targets[k % n];
        int switched = t != current;
        if (current) {
            if (switched)
                now = stop_sending(current);
            count_turn(current, began, now);
        }
        if (switched) {
            start_sending(t, now);
            current = t;
        }
        began = now;
        t->measuring = !warm;
        if (!warm) {
            t->turns++;
            t->started += switched;
        }
        now = run_until(now + (warm ? warm_ns : turn_ns), NULL, NULL);
    }
    now = stop_sending(current);
    count_turn(current, began, now);
}

/* --fill: every active connection puts its share of the keyspace, once. */
static void run_fill(struct target *t)
{
    uint64_t start = now_ns();
    t->measuring = 1;
    t->busy = opt.connections;
    start_sending(t, start);
    for (int i = 0; i < opt.connections; i++) {
        if (t->conns[i].outstanding == 0) {
            t->conns[i].state = ST_IDLE;
            t->busy--;
        }
    }
    uint64_t now = run_until(UINT64_MAX, filled, t);
    t->measured_ns = now - start;
}

int main(int argc, char **argv)
{
    parse_args(argc, argv);
    set_nofile_limit((long)opt.ntargets * opt.connections + 64);
    epfd = epoll_create1(EPOLL_CLOEXEC);
    if (epfd < 0)
        die("epoll_create1: %s", strerror(errno));

    /* The idle connections first, so that no holder inherits active ones. */
    for (int k = 0; k < opt.ntargets; k++) {
        struct target *t = &targets[k];
        t->port = opt.ports[k];
        t->proto = opt.protos[k];
        if (opt.idle) {
            struct addrinfo *ai = resolve(t->port);
            hold_idle(t, ai);
            freeaddrinfo(ai);
        }
    }
    int64_t share = (opt.keyspace + opt.connections - 1) / opt.connections;
    for (int k = 0; k < opt.ntargets; k++) {
        struct target *t = &targets[k];
        struct addrinfo *ai = resolve(t->port);
        t->conns = calloc((size_t)opt.connections, sizeof *t->conns);
        if (!t->conns)
            die("out of memory");
        for (int i = 0; i < opt.connections; i++) {
            struct conn *c = &t->conns[i];
            init_conn(c, t, i, opt.depth, RBUF_SIZE);
            c->next_fill_key = share * i;
            c->fill_end = share * (i + 1) < opt.keyspace ? share * (i + 1) : opt.keyspace;
            start_connect(c, ai);
        }
        freeaddrinfo(ai);

        struct epoll_event events[MAX_EVENTS];
        int connected = 0;
        while (connected < opt.connections) {
            int n = epoll_wait(epfd, events, MAX_EVENTS, 10000);
            if (n == 0)
                die("timed out connecting to port %s", t->port);
            for (int i = 0; i < n; i++) {
                struct conn *c = events[i].data.ptr;
                if (c->state == ST_CONNECTING) {
                    dispatch(&events[i], ST_ACTIVE);
                    connected++;
                }
            }
        }
    }

    if (opt.fill)
        run_fill(&targets[0]);
    else
        run_turns();
    release_idle();
    for (int k = 0; k < opt.ntargets; k++)
        print_result(&targets[k]);
    return 0;
}
