/*
 * fingerload: finger queries against one server as fast as it answers.
 *
 *   fingerload HOST PORT CONCURRENCY SECONDS MAXQUERIES DOMAIN...
 *
 * Keeps CONCURRENCY connections going, each one query (a domain, in turn)
 * and its whole answer, as the finger client does; stops after SECONDS
 * or MAXQUERIES queries (0: no limit). Prints "answered failed seconds".
 * An answer counts when it names the domain asked for. Written in C so
 * that on a small machine the load costs little next to the server it
 * measures (the benchmark compiles it with the system's cc).
 */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

struct conn {
    int fd;
    int sent;
    const char *domain;
    char buf[2048];
    size_t len;
};

static struct sockaddr_in addr;
static char **domains;
static int ndomains, next_domain;
static long started_queries, max_queries, answered, failed;

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static int start(int ep, struct conn *c)
{
    struct epoll_event ev;

    if (max_queries && started_queries >= max_queries)
        return 0;
    started_queries++;
    c->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    if (c->fd < 0)
        return 0;
    c->sent = 0;
    c->len = 0;
    c->domain = domains[next_domain++ % ndomains];
    if (connect(c->fd, (struct sockaddr *) &addr, sizeof(addr)) < 0 && errno != EINPROGRESS) {
        close(c->fd);
        failed++;
        return 0;
    }
    ev.events = EPOLLOUT | EPOLLIN;
    ev.data.ptr = c;
    epoll_ctl(ep, EPOLL_CTL_ADD, c->fd, &ev);
    return 1;
}

static void finish(int ep, struct conn *c)
{
    c->buf[c->len] = 0;
    if (strstr(c->buf, c->domain))
        answered++;
    else
        failed++;
    epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    c->fd = -1;
}

int main(int argc, char **argv)
{
    int concurrency, active = 0, ep, i, n;
    double seconds, begin, deadline;
    struct conn *conns;
    struct epoll_event events[256];

    if (argc < 7) {
        fprintf(stderr, "usage: fingerload HOST PORT CONCURRENCY SECONDS MAXQUERIES DOMAIN...\n");
        return 2;
    }
    memset(&addr, 0, sizeof(addr));
    addr.sin_family = AF_INET;
    addr.sin_port = htons(atoi(argv[2]));
    if (inet_pton(AF_INET, argv[1], &addr.sin_addr) != 1) {
        fprintf(stderr, "fingerload: bad address %s\n", argv[1]);
        return 2;
    }
    concurrency = atoi(argv[3]);
    seconds = atof(argv[4]);
    max_queries = atol(argv[5]);
    domains = argv + 6;
    ndomains = argc - 6;
    conns = calloc(concurrency, sizeof(*conns));
    ep = epoll_create1(0);
    begin = now();
    deadline = begin + seconds;
    for (i = 0; i < concurrency; i++)
        active += start(ep, &conns[i]);
    while (active > 0) {
        n = epoll_wait(ep, events, 256, 1000);
        for (i = 0; i < n; i++) {
            struct conn *c = events[i].data.ptr;
            if (!c->sent && (events[i].events & EPOLLOUT)) {
                char query[300];
                int qlen = snprintf(query, sizeof(query), "%s\r\n", c->domain);
                if (write(c->fd, query, qlen) != qlen) {
                    finish(ep, c);
                } else {
                    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
                    c->sent = 1;
                    epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
                    continue;
                }
            } else if (events[i].events & (EPOLLIN | EPOLLHUP | EPOLLERR)) {
                ssize_t got = read(c->fd, c->buf + c->len, sizeof(c->buf) - 1 - c->len);
                if (got > 0) {
                    c->len += got;
                    if (c->len < sizeof(c->buf) - 1)
                        continue;
                }
                finish(ep, c);
            } else {
                continue;
            }
            active--;
            if (now() < deadline)
                active += start(ep, c);
        }
    }
    printf("%ld %ld %.3f\n", answered, failed, now() - begin);
    return 0;
}
