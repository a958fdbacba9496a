/* djprobe test target: the parent calls fc_work N times, then forks CHILDREN children (one at a
 * time) that each call fc_work CHILD_CALLS times from two threads and check every result (exit
 * status: the number of wrong ones, at most 100), then calls fc_work N times more.
 * Usage: forkcount N CHILDREN [CHILD_CALLS]. Stdin: waits for one line before starting (so a
 * tracer can attach). Prints "parent N2 children C bad B" (N2: its own calls). A child given
 * "x" as argv[4] execs itself (argv[0] N 0) instead of running its threads, or the program
 * argv[5] when given (a build of this file for the other architecture: argv[5] N 0). */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

static long child_calls = 100000;

__attribute__((noinline)) long fc_work(long x) { return x * 7 + 2; }

static void *child_thread(void *arg) {
    long t = (long)arg, bad = 0;
    for (long i = 0; i < child_calls; i++)
        if (fc_work(i + t) != (i + t) * 7 + 2) bad++;
    return (void *)bad;
}

int main(int argc, char **argv) {
    if (argc < 3) return 2;
    long n = atol(argv[1]), children = atol(argv[2]), bad = 0, mine = 0;
    if (argc > 3) child_calls = atol(argv[3]);
    int exec_child = argc > 4 && strcmp(argv[4], "x") == 0;
    char line[16];
    if (children && !fgets(line, sizeof line, stdin)) return 2;
    for (long i = 0; i < n; i++, mine++) if (fc_work(i) != i * 7 + 2) bad++;
    for (long c = 0; c < children; c++) {
        pid_t pid = fork();
        if (pid == 0) {
            if (exec_child && c == 0) {
                char num[32];
                snprintf(num, sizeof num, "%ld", child_calls);
                const char *prog = argc > 5 ? argv[5] : argv[0];
                execl(prog, prog, num, "0", (char *)NULL);
                _exit(127);
            }
            pthread_t th[2];
            long cbad = 0;
            for (long t = 0; t < 2; t++) pthread_create(&th[t], NULL, child_thread, (void *)t);
            for (long t = 0; t < 2; t++) { void *r; pthread_join(th[t], &r); cbad += (long)r; }
            _exit(cbad > 100 ? 100 : (int)cbad);
        }
        int status = 0;
        waitpid(pid, &status, 0);
        if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) bad++;
    }
    for (long i = 0; i < n; i++, mine++) if (fc_work(i) != i * 7 + 2) bad++;
    printf("parent %ld children %ld bad %ld\n", mine, children, bad);
    return bad ? 3 : 0;
}
