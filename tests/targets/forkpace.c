/* djprobe test target: the parent calls fp_work M times, reads a line from stdin, then forks N
 * children GAP_MS milliseconds apart (each calls fp_work K times, checks every result and exits
 * with the number wrong, at most 100), writing "forked I" to stderr after each fork; it waits for
 * them all and writes "done bad B" to stderr (B: wrong results and children that did not exit
 * 0). Exit status 0 when B is 0, else 3. Nothing is written to stdout (the tracer's pipe).
 * Usage: forkpace M N K GAP_MS */
#include <stdio.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

__attribute__((noinline)) long fp_work(long x) { return x * 5 + 3; }

int main(int argc, char **argv) {
    if (argc < 5) return 2;
    long m = atol(argv[1]), n = atol(argv[2]), k = atol(argv[3]), gap_ms = atol(argv[4]), bad = 0;
    char line[16];
    for (long i = 0; i < m; i++) if (fp_work(i) != i * 5 + 3) bad++;
    if (!fgets(line, sizeof line, stdin)) return 2;
    pid_t pids[256];
    if (n > 256) n = 256;
    for (long c = 0; c < n; c++) {
        if (c) {
            struct timespec ts = {gap_ms / 1000, (gap_ms % 1000) * 1000000L};
            nanosleep(&ts, NULL);
        }
        pid_t pid = fork();
        if (pid == 0) {
            long cbad = 0;
            for (long i = 0; i < k; i++) if (fp_work(i) != i * 5 + 3) cbad++;
            _exit(cbad > 100 ? 100 : (int)cbad);
        }
        if (pid < 0) { bad++; continue; }
        pids[c] = pid;
        fprintf(stderr, "forked %ld\n", c + 1);
    }
    for (long c = 0; c < n; c++) {
        int status = 0;
        if (waitpid(pids[c], &status, 0) != pids[c] || !WIFEXITED(status) || WEXITSTATUS(status) != 0) bad++;
    }
    fprintf(stderr, "done bad %ld\n", bad);
    return bad ? 3 : 0;
}
