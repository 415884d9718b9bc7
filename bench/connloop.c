/* The loopback benchmark's load: a server that accepts and closes, and a client that opens and
 * closes connections as fast as it can for a while, so that the kernel's work (and our rules'
 * share of it) dominates, not an interpreter's. libc only.
 *
 *   connloop server PORT            prints "ready", then accepts and closes until killed
 *   connloop client PORT SECONDS    prints the connections per second it managed
 *
 * The client closes with SO_LINGER 0 (a reset): no TIME_WAIT, so long runs never run out of ports. */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: connloop server PORT | connloop client PORT SECONDS\n");
        return 2;
    }
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[2]))};
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (strcmp(argv[1], "server") == 0) {
        int one = 1, s = socket(AF_INET, SOCK_STREAM, 0);
        setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
        if (bind(s, (struct sockaddr *)&addr, sizeof addr) || listen(s, 4096)) {
            perror("connloop server");
            return 1;
        }
        printf("ready\n");
        fflush(stdout);
        for (;;) {
            int c = accept(s, NULL, NULL);
            if (c >= 0) close(c);
        }
    }
    double seconds = argc > 3 ? atof(argv[3]) : 1.0, started = now(), elapsed;
    long n = 0, failed = 0;
    struct linger reset = {.l_onoff = 1, .l_linger = 0};
    while ((elapsed = now() - started) < seconds) {
        int s = socket(AF_INET, SOCK_STREAM, 0);
        setsockopt(s, SOL_SOCKET, SO_LINGER, &reset, sizeof reset);
        if (connect(s, (struct sockaddr *)&addr, sizeof addr) == 0) n++;
        else failed++;
        close(s);
    }
    printf("%.1f %ld\n", n / elapsed, failed);
    return 0;
}
