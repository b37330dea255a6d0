/*
 * client.c: an interactive client for the kvtwist key-value server.
 *
 *   gcc -Wall -Wextra client.c -o client
 *   ./client HOST PORT
 *
 * It reads one request per line from standard input, sends it, and prints
 * the server's one-line reply. At the end of input it says Bye, so a script
 * piped into it ends the conversation cleanly.
 *
 * A kvtwist server speaks only to answer, except when it closes a connection
 * of its own accord: then it may first send one line saying why (an idle
 * timeout, or too many connections when it refuses a new client). So while
 * the client waits for the next request it watches the connection too, and
 * a close is reported at once, with that last line:
 *
 *   Server closed the connection: Error: idle timeout
 *
 * Exit status: 0 after the server's Goodbye, 1 when the connection cannot be
 * made, breaks, or is closed by the server, 2 for wrong usage.
 */

#define _POSIX_C_SOURCE 200809L

#include <errno.h>
#include <netdb.h>
#include <poll.h>
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
/* How long to listen, right after connecting, for a server that refuses us
 * (it says so at once). Only then does the client say it is connected. */
#define REFUSAL_WAIT_MS 100
/* How long to wait for the close that follows a line the server sent
 * without being asked. */
#define CLOSE_WAIT_MS 1000

/* Bytes received but not yet handed out as a reply line. A reply may arrive
 * split over several reads, or together with the start of the next one. */
static char inbox[MAX_REPLY];
static size_t inbox_len;

/* Bytes of standard input not yet handed out as a request: room for the
 * longest request, a CR and the LF. */
static char input[MAX_REQUEST + 2];
static size_t input_len;
static int input_ended;      /* standard input is at its end */
static int input_discarding; /* skipping the rest of a line that is too long */

/* "Enter request: " is on the screen, waiting for its line. */
static int prompt_open;

/* What a read from the server brought. */
enum received { RECEIVED_DATA, RECEIVED_CLOSE, RECEIVED_ERROR, RECEIVED_FULL };

/* What take_request returns when it has no request to give. */
enum { INPUT_ENDED = -1, INPUT_TOO_LONG = -2, INPUT_PENDING = -3 };

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

/* End the prompt's line, so that a message does not run on after it. */
static void close_prompt(void)
{
    if (prompt_open) {
        printf("\n");
        prompt_open = 0;
    }
    fflush(stdout);
}

/* Read what the server has sent into the inbox. A reset counts as a close:
 * the server is gone either way. */
static enum received receive(int fd)
{
    ssize_t n;

    if (inbox_len == sizeof inbox)
        return RECEIVED_FULL;
    do
        n = recv(fd, inbox + inbox_len, sizeof inbox - inbox_len, 0);
    while (n < 0 && errno == EINTR);
    if (n == 0 || (n < 0 && errno == ECONNRESET))
        return RECEIVED_CLOSE;
    if (n < 0) {
        close_prompt();
        fprintf(stderr, "Connection lost: %s\n", strerror(errno));
        return RECEIVED_ERROR;
    }
    inbox_len += (size_t)n;
    return RECEIVED_DATA;
}

/* The last line in the inbox (complete or not), without its line ending;
 * its length goes to *len, 0 when the inbox holds no text. */
static const char *last_line(size_t *len)
{
    size_t end = inbox_len, start;

    while (end > 0 && (inbox[end - 1] == '\n' || inbox[end - 1] == '\r'))
        end--;
    start = end;
    while (start > 0 && inbox[start - 1] != '\n')
        start--;
    *len = end - start;
    return inbox + start;
}

/* Forget all but the last complete line and what follows it, to make room. */
static void keep_last_line(void)
{
    char *newline = memchr(inbox, '\n', inbox_len);
    char *last = NULL;

    while (newline != NULL) {
        char *next = memchr(newline + 1, '\n', inbox_len - (size_t)(newline + 1 - inbox));
        if (next == NULL)
            break;
        last = newline;
        newline = next;
    }
    if (last != NULL) {
        inbox_len -= (size_t)(last + 1 - inbox);
        memmove(inbox, last + 1, inbox_len);
    }
}

/* The server has closed the connection: say so, with what it said last that
 * has not been shown. */
static void report_close(void)
{
    size_t len;
    const char *line = last_line(&len);

    close_prompt();
    if (len == 0)
        fprintf(stderr, "Server closed the connection without a message\n");
    else
        fprintf(stderr, "Server closed the connection: %.*s\n", (int)len, line);
}

/* The server has sent something nobody asked for. A kvtwist server does that
 * only just before it closes, so wait for the close and report it. Either
 * way the conversation is over: replies can no longer be matched with
 * requests. */
static void report_unasked(int fd)
{
    struct pollfd watch = { .fd = fd, .events = POLLIN };
    size_t len;
    const char *line;

    for (;;) {
        int ready = poll(&watch, 1, CLOSE_WAIT_MS);
        if (ready < 0 && errno == EINTR)
            continue;
        if (ready <= 0)
            break;
        keep_last_line();
        switch (receive(fd)) {
        case RECEIVED_DATA:
            continue;
        case RECEIVED_CLOSE:
            report_close();
            return;
        case RECEIVED_ERROR:
            return;
        case RECEIVED_FULL:
            break; /* a line longer than a reply can be: give up waiting */
        }
        break;
    }
    line = last_line(&len);
    close_prompt();
    fprintf(stderr, "Server sent a line nobody asked for: %.*s\n", (int)len, line);
}

/* Look at the connection while no reply is due, waiting up to timeout_ms
 * (-1: for ever) for the connection or, when watch_input, standard input.
 * Returns 0 if all is well (input may be ready), -1 if the conversation is
 * over (already reported). */
static int watch_connection(int fd, int watch_input, int timeout_ms)
{
    struct pollfd watch[2] = {
        { .fd = fd, .events = POLLIN },
        { .fd = STDIN_FILENO, .events = POLLIN },
    };
    int ready;

    do
        ready = poll(watch, watch_input ? 2 : 1, timeout_ms);
    while (ready < 0 && errno == EINTR);
    if (ready < 0) {
        close_prompt();
        fprintf(stderr, "poll: %s\n", strerror(errno));
        return -1;
    }
    if (watch[0].revents == 0)
        return 0;
    switch (receive(fd)) {
    case RECEIVED_CLOSE:
        report_close();
        break;
    case RECEIVED_DATA:
    case RECEIVED_FULL:
        report_unasked(fd);
        break;
    case RECEIVED_ERROR:
        break;
    }
    return -1;
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
        switch (receive(fd)) {
        case RECEIVED_DATA:
            continue;
        case RECEIVED_CLOSE:
            report_close();
            return -1;
        case RECEIVED_FULL:
            fprintf(stderr, "The server sent a reply longer than %d bytes\n", MAX_REPLY);
            return -1;
        case RECEIVED_ERROR:
            return -1;
        }
    }
}

/* Read more of standard input. A read error ends the input like its end. */
static void read_input(void)
{
    ssize_t n;

    do
        n = read(STDIN_FILENO, input + input_len, sizeof input - input_len);
    while (n < 0 && errno == EINTR);
    if (n <= 0)
        input_ended = 1;
    else
        input_len += (size_t)n;
}

/* Take the next line of input out of the input buffer into line (at least
 * MAX_REQUEST + 1 bytes). Returns its length; INPUT_ENDED at the end of
 * input; INPUT_TOO_LONG (having skipped the whole line) when it is too long
 * to send; INPUT_PENDING when no whole line has been read yet. */
static long take_request(char *line)
{
    for (;;) {
        char *newline = memchr(input, '\n', input_len);
        size_t len, used;

        if (input_discarding) {
            if (newline == NULL && !input_ended) {
                input_len = 0;
                return INPUT_PENDING;
            }
            used = newline != NULL ? (size_t)(newline + 1 - input) : input_len;
            input_len -= used;
            memmove(input, input + used, input_len);
            input_discarding = 0;
            return INPUT_TOO_LONG;
        }
        if (newline != NULL) {
            len = (size_t)(newline - input);
            used = len + 1;
        } else if (input_len == sizeof input) {
            input_discarding = 1;
            continue;
        } else if (input_ended && input_len > 0) {
            len = used = input_len; /* a last line without its newline */
        } else {
            return input_ended ? INPUT_ENDED : INPUT_PENDING;
        }
        if (len > 0 && input[len - 1] == '\r')
            len--;
        if (len > MAX_REQUEST) {
            input_len -= used;
            memmove(input, input + used, input_len);
            return INPUT_TOO_LONG;
        }
        memcpy(line, input, len);
        line[len] = '\0';
        input_len -= used;
        memmove(input, input + used, input_len);
        /* A NUL byte would end the request at the server too; send only
         * what comes before it, as a C string would. */
        return (long)strlen(line);
    }
}

static int is_blank(const char *s)
{
    return s[strspn(s, " \t")] == '\0';
}

int main(int argc, char **argv)
{
    /* Room for the longest request, the newline and the NUL. */
    char line[MAX_REQUEST + 2];
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
    /* A server over its connection limit accepts, says why it will not
     * serve us, and closes: give it a moment to do so before saying that we
     * are connected. */
    if (watch_connection(fd, 0, REFUSAL_WAIT_MS) < 0) {
        close(fd);
        return 1;
    }
    printf("Connected to server\n");

    for (;;) {
        long len;

        printf("Enter request: ");
        fflush(stdout);
        prompt_open = 1;
        /* Wait for a whole line of input, and meanwhile for the server,
         * which may close the connection (and should be heard first). */
        for (;;) {
            int pending;

            len = take_request(line);
            pending = len == INPUT_PENDING;
            if ((len >= 0 || len == INPUT_TOO_LONG) && !echo)
                prompt_open = 0; /* the terminal has shown the line's end */
            if (watch_connection(fd, pending, pending ? -1 : 0) < 0) {
                close(fd);
                return 1;
            }
            if (!pending)
                break;
            read_input();
        }
        prompt_open = 0;
        if (len == INPUT_TOO_LONG) {
            if (echo)
                printf("\n");
            printf("Request too long (more than %d bytes); not sent\n", MAX_REQUEST);
            continue;
        }
        if (len == INPUT_ENDED) {
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
