/*
 * cserver: a minimal single-threaded epoll server for the kvtwist protocol.
 *
 * It exists only to calibrate the benchmark: it shows how fast kvbench can
 * drive a server that costs almost nothing per request, so that a kvtwist or
 * Redis figure well below it is known to measure the server, not kvbench.
 * It implements put/get/del/bye over an open-addressing table; malformed
 * requests get a generic error line. It is not a product.
 *
 * Build: gcc -O2 -Wall -Wextra cserver.c -o cserver
 * Run:   ./cserver PORT        (listens on 127.0.0.1; prints the port)
 */
#define _GNU_SOURCE
#include <ctype.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#define BUF_SIZE 65536
#define MAX_EVENTS 256

struct client {
    int fd;
    size_t rlen;
    char rbuf[BUF_SIZE];
};

/* Linear probing with tombstones; the table doubles at half load. */
static int64_t *keys, *vals;
static unsigned char *used; /* 0 empty, 1 live, 2 deleted */
static size_t cap = 1024, live, filled;

static size_t slot_of(int64_t k)
{
    uint64_t h = (uint64_t)k * 0x9E3779B97F4A7C15ULL;
    return (size_t)(h >> 20) & (cap - 1);
}

static void table_init(size_t n)
{
    cap = n;
    keys = calloc(cap, sizeof *keys);
    vals = calloc(cap, sizeof *vals);
    used = calloc(cap, 1);
    if (!keys || !vals || !used) {
        perror("calloc");
        exit(1);
    }
    live = filled = 0;
}

static long find(int64_t k)
{
    for (size_t i = slot_of(k);; i = (i + 1) & (cap - 1)) {
        if (used[i] == 0)
            return -1;
        if (used[i] == 1 && keys[i] == k)
            return (long)i;
    }
}

static int put(int64_t k, int64_t v);

static void grow(void)
{
    int64_t *ok = keys, *ov = vals;
    unsigned char *ou = used;
    size_t ocap = cap;
    table_init(live * 4 > ocap ? ocap * 2 : ocap);
    for (size_t i = 0; i < ocap; i++)
        if (ou[i] == 1)
            put(ok[i], ov[i]);
    free(ok);
    free(ov);
    free(ou);
}

static int put(int64_t k, int64_t v)
{
    if (find(k) >= 0)
        return 0;
    if ((filled + 1) * 2 > cap)
        grow();
    size_t i = slot_of(k);
    while (used[i] == 1)
        i = (i + 1) & (cap - 1);
    if (used[i] == 0)
        filled++;
    used[i] = 1;
    keys[i] = k;
    vals[i] = v;
    live++;
    return 1;
}

static int parse_i64(const char *s, int64_t *out)
{
    char *end;
    errno = 0;
    long long v = strtoll(s, &end, 10);
    if (errno || *end || end == s || !(isdigit((unsigned char)s[0]) || s[0] == '-' || s[0] == '+'))
        return 0;
    *out = v;
    return 1;
}

/* Execute one request line (NUL-terminated, LF removed); append its reply. */
static int execute(char *line, char *out, size_t *olen)
{
    char *tok[4];
    int n = 0;
    for (char *save = NULL, *t = strtok_r(line, " \t\r", &save); t; t = strtok_r(NULL, " \t\r", &save))
        if (n < 4)
            tok[n++] = t;
        else
            n = 5;
    const char *reply;
    char num[24];
    int64_t k, v;
    long i;
    if (n == 0)
        return 1;
    if (n == 3 && strcasecmp(tok[0], "put") == 0 && parse_i64(tok[1], &k) && parse_i64(tok[2], &v)) {
        reply = put(k, v) ? "OK" : "Key already exists";
    } else if (n == 2 && strcasecmp(tok[0], "get") == 0 && parse_i64(tok[1], &k)) {
        i = find(k);
        if (i < 0) {
            reply = "Key not found";
        } else {
            snprintf(num, sizeof num, "%lld", (long long)vals[i]);
            reply = num;
        }
    } else if (n == 2 && strcasecmp(tok[0], "del") == 0 && parse_i64(tok[1], &k)) {
        i = find(k);
        if (i >= 0) {
            used[i] = 2;
            live--;
        }
        reply = i >= 0 ? "OK" : "Key not found";
    } else if (n == 1 && strcasecmp(tok[0], "bye") == 0) {
        reply = "Goodbye";
    } else {
        reply = "Error: bad request";
    }
    size_t len = strlen(reply);
    memcpy(out + *olen, reply, len);
    out[*olen + len] = '\n';
    *olen += len + 1;
    return strcmp(reply, "Goodbye") != 0;
}

static void drop(int ep, struct client *c)
{
    epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    free(c);
}

static void serve(int ep, struct client *c)
{
    static char out[BUF_SIZE * 16]; /* a reply is never 16 times its request */
    ssize_t n = read(c->fd, c->rbuf + c->rlen, BUF_SIZE - 1 - c->rlen);
    if (n <= 0) {
        if (n < 0 && errno == EAGAIN)
            return;
        drop(ep, c);
        return;
    }
    c->rlen += (size_t)n;
    size_t olen = 0, start = 0;
    int keep = 1;
    for (size_t i = 0; i < c->rlen && keep; i++) {
        if (c->rbuf[i] == '\n' || c->rbuf[i] == '\0') {
            c->rbuf[i] = '\0';
            keep = execute(c->rbuf + start, out, &olen);
            start = i + 1;
        }
    }
    if (start == 0 && c->rlen == BUF_SIZE - 1)
        keep = 0;
    memmove(c->rbuf, c->rbuf + start, c->rlen - start);
    c->rlen -= start;
    /* Replies are small and the client reads them; a short write is not
     * worth handling in a calibration server. */
    if (olen && write(c->fd, out, olen) < 0)
        keep = 0;
    if (!keep)
        drop(ep, c);
}

int main(int argc, char **argv)
{
    int port = argc > 1 ? atoi(argv[1]) : 0;
    int lfd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    int one = 1;
    setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port),
                               .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    if (bind(lfd, (struct sockaddr *)&addr, sizeof addr) < 0 || listen(lfd, 1024) < 0) {
        perror("cserver: listen");
        return 1;
    }
    socklen_t alen = sizeof addr;
    getsockname(lfd, (struct sockaddr *)&addr, &alen);
    printf("cserver listening on 127.0.0.1:%d\n", ntohs(addr.sin_port));
    fflush(stdout);

    table_init(1024);
    int ep = epoll_create1(0);
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = NULL};
    epoll_ctl(ep, EPOLL_CTL_ADD, lfd, &ev);
    struct epoll_event events[MAX_EVENTS];
    for (;;) {
        int n = epoll_wait(ep, events, MAX_EVENTS, -1);
        for (int i = 0; i < n; i++) {
            if (events[i].data.ptr == NULL) {
                int fd;
                while ((fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK)) >= 0) {
                    struct client *c = malloc(sizeof *c);
                    if (!c) {
                        close(fd);
                        continue;
                    }
                    c->fd = fd;
                    c->rlen = 0;
                    struct epoll_event cev = {.events = EPOLLIN, .data.ptr = c};
                    epoll_ctl(ep, EPOLL_CTL_ADD, fd, &cev);
                }
            } else {
                serve(ep, events[i].data.ptr);
            }
        }
    }
}
