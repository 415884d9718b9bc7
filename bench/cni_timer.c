/* The CNI plugin's exec as the runtime sees it, timed from outside: installed in the plugin's
 * place, it runs the real plugin (same argv, environment, stdin and stdout) and appends
 * a line to a log once it has exited. What it adds itself (a fork) is outside the
 * interval, in place of the runtime's own exec of the plugin. The log's line is
 * "<command> <start> <end>", CLOCK_MONOTONIC seconds (the agent's clock too). libc only.
 *
 *   cc -O2 -static -DPLUGIN='"/path/netisolate-cni.timed"' -DLOG='"/path/times"' -o netisolate-cni bench/cni_timer.c */
#include <stdio.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

int main(int argc, char **argv) {
    double started = now();
    const char *command = getenv("CNI_COMMAND");
    int status = 0;
    pid_t child = fork();
    (void)argc;
    if (child == 0) {
        execv(PLUGIN, argv);
        _exit(127);
    }
    if (child < 0 || waitpid(child, &status, 0) < 0)
        return 1;
    double ended = now();
    FILE *log = fopen(LOG, "a");
    if (log) {
        fprintf(log, "%s %.6f %.6f\n", command ? command : "?", started, ended);
        fclose(log);
    }
    return WIFEXITED(status) ? WEXITSTATUS(status) : 1;
}
