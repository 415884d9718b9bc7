/* The loopback benchmark's load: a server that accepts and closes, and a client that opens and
 * closes connections as fast as it can, one measurement for each line it reads, so that the
 * kernel's work (and our rules' share of it) dominates, not an interpreter's, and one client
 * process serves every round of a run. libc only.
 *
 *   connloop server PORT [CPU]   prints "ready", then accepts and closes until killed
 *   connloop client PORT [CPU]   for each line SECONDS it reads: opens and closes connections for
 *                                that long, then prints "CONNECTIONS_PER_S FAILED CONNECTIONS"
 *
 * CPU (>= 0) pins the process to that CPU: client and server on one CPU keep the whole handshake
 * (and the softirq work of its packets, charged to the process that sends them) on it.
 * The client closes with SO_LINGER 0 (a reset): no TIME_WAIT, so long runs never run out of ports. */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sched.h>
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

static int pin(const char *cpu) {
    cpu_set_t set;
    if (cpu == NULL || atoi(cpu) < 0) return 0;
    CPU_ZERO(&set);
    CPU_SET(atoi(cpu), &set);
    if (sched_setaffinity(0, sizeof set, &set) == 0) return 0;
    perror("connloop: sched_setaffinity");
    return 1;
}

static int serve(struct sockaddr_in *addr) {
    int one = 1, s = socket(AF_INET, SOCK_STREAM, 0);
    setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (bind(s, (struct sockaddr *)addr, sizeof *addr) || listen(s, 4096)) {
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

static void measure(struct sockaddr_in *addr, double seconds) {
    double started = now(), elapsed;
    long n = 0, failed = 0;
    struct linger reset = {.l_onoff = 1, .l_linger = 0};
    while ((elapsed = now() - started) < seconds) {
        int s = socket(AF_INET, SOCK_STREAM, 0);
        setsockopt(s, SOL_SOCKET, SO_LINGER, &reset, sizeof reset);
        if (connect(s, (struct sockaddr *)addr, sizeof *addr) == 0) n++;
        else failed++;
        close(s);
    }
    printf("%.1f %ld %ld\n", n / elapsed, failed, n);
    fflush(stdout);
}

int main(int argc, char **argv) {
    if (argc < 3 || (strcmp(argv[1], "server") && strcmp(argv[1], "client"))) {
        fprintf(stderr, "usage: connloop server PORT [CPU] | connloop client PORT [CPU]\n");
        return 2;
    }
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[2]))};
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (pin(argc > 3 ? argv[3] : NULL)) return 1;
    if (strcmp(argv[1], "server") == 0) return serve(&addr);
    char line[64];
    while (fgets(line, sizeof line, stdin)) measure(&addr, atof(line));
    return 0;
}
