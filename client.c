/*
 * client.c: an interactive client for the kvtwist key-value server.
 *
 *   gcc -Wall -Wextra client.c -o client
 *   ./client HOST PORT
 *
 * It reads one request per line from standard input, sends it, and prints
 * the server's one-line reply. At the end of input it says Bye, so a script
 * piped into it ends the conversation cleanly. Exit status: 0 after the
 * server's Goodbye, 1 when the connection cannot be made or breaks, 2 for
 * wrong usage.
 */

#define _POSIX_C_SOURCE 200809L

#include <errno.h>
#include <netdb.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <unistd.h>

/* The server's default request limit; longer input is refused here rather
 * than sent in pieces. */
#define MAX_REQUEST 4096
/* Replies are short (a number or a message); anything longer is not ours. */
#define MAX_REPLY 8192

/* Bytes received but not yet handed out as a reply line. A reply may arrive
 * split over several reads, or together with the start of the next one. */
static char inbox[MAX_REPLY];
static size_t inbox_len;

static int connect_to(const char *host, const char *port)
{
    struct addrinfo hints, *found, *ai;
    int fd = -1, rc, saved_errno = 0;

    memset(&hints, 0, sizeof hints);
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    rc = getaddrinfo(host, port, &hints, &found);
    if (rc != 0) {
        fprintf(stderr, "Cannot resolve %s port %s: %s\n", host, port, gai_strerror(rc));
        return -1;
    }
    for (ai = found; ai != NULL; ai = ai->ai_next) {
        fd = socket(ai->ai_family, ai->ai_socktype, ai->ai_protocol);
        if (fd < 0) {
            saved_errno = errno;
            continue;
        }
        if (connect(fd, ai->ai_addr, ai->ai_addrlen) == 0)
            break;
        saved_errno = errno;
        close(fd);
        fd = -1;
    }
    freeaddrinfo(found);
    if (fd < 0)
        fprintf(stderr, "Cannot connect to %s port %s: %s\n", host, port, strerror(saved_errno));
    return fd;
}

static int send_all(int fd, const char *data, size_t len)
{
    while (len > 0) {
        ssize_t n = send(fd, data, len, 0);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            fprintf(stderr, "Connection lost while sending: %s\n", strerror(errno));
            return -1;
        }
        data += n;
        len -= (size_t)n;
    }
    return 0;
}

/* Read one reply line into reply (without its line ending). */
static int read_reply(int fd, char *reply, size_t size)
{
    for (;;) {
        char *newline = memchr(inbox, '\n', inbox_len);
        if (newline != NULL) {
            size_t line_len = (size_t)(newline - inbox);
            size_t rest = inbox_len - line_len - 1;
            if (line_len > 0 && inbox[line_len - 1] == '\r')
                line_len--;
            if (line_len >= size)
                line_len = size - 1;
            memcpy(reply, inbox, line_len);
            reply[line_len] = '\0';
            memmove(inbox, newline + 1, rest);
            inbox_len = rest;
            return 0;
        }
        if (inbox_len == sizeof inbox) {
            fprintf(stderr, "The server sent a reply longer than %d bytes\n", MAX_REPLY);
            return -1;
        }
        ssize_t n = recv(fd, inbox + inbox_len, sizeof inbox - inbox_len, 0);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0) {
            fprintf(stderr, "Connection lost: %s\n", strerror(errno));
            return -1;
        }
        if (n == 0) {
            fprintf(stderr, "The server closed the connection unexpectedly\n");
            return -1;
        }
        inbox_len += (size_t)n;
    }
}

/* Read one line of input. Returns its length, -1 at end of input, or -2
 * (after discarding the rest of the line) when it is too long to send. */
static long read_request(char *line, size_t size)
{
    size_t len;

    if (fgets(line, (int)size, stdin) == NULL)
        return -1;
    len = strlen(line);
    if (len > 0 && line[len - 1] == '\n') {
        line[--len] = '\0';
    } else if (!feof(stdin)) {
        int c;
        while ((c = getchar()) != EOF && c != '\n')
            ;
        return -2;
    }
    if (len > 0 && line[len - 1] == '\r')
        line[--len] = '\0';
    if (len > MAX_REQUEST)
        return -2;
    return (long)len;
}

static int is_blank(const char *s)
{
    return s[strspn(s, " \t")] == '\0';
}

int main(int argc, char **argv)
{
    /* Room for the longest request, a CR, the newline and the NUL. */
    char line[MAX_REQUEST + 3];
    char reply[MAX_REPLY + 1];
    int echo = !isatty(STDIN_FILENO);
    int fd;

    if (argc != 3) {
        fprintf(stderr, "usage: %s HOST PORT\n", argv[0]);
        return 2;
    }
    /* A closed connection should be an error we report, not a silent death. */
    signal(SIGPIPE, SIG_IGN);

    fd = connect_to(argv[1], argv[2]);
    if (fd < 0)
        return 1;
    printf("Connected to server\n");

    for (;;) {
        long len;

        printf("Enter request: ");
        fflush(stdout);
        len = read_request(line, sizeof line);
        if (len == -2) {
            if (echo)
                printf("\n");
            printf("Request too long (more than %d bytes); not sent\n", MAX_REQUEST);
            continue;
        }
        if (len == -1) {
            /* End of input: leave politely. */
            strcpy(line, "Bye");
            len = 3;
            printf("Bye\n");
        } else if (echo) {
            /* Input from a pipe is not echoed by a terminal; show it, so a
             * scripted session reads like an interactive one. */
            printf("%s\n", line);
        }
        if (is_blank(line))
            continue; /* the server does not answer blank requests */

        line[len] = '\n';
        if (send_all(fd, line, (size_t)len + 1) < 0)
            break;
        if (read_reply(fd, reply, sizeof reply) < 0)
            break;
        printf("Server replied: %s\n", reply);
        if (strcmp(reply, "Goodbye") == 0) {
            close(fd);
            return 0;
        }
    }
    close(fd);
    return 1;
}
