/* djprobe test target: what a vfork child calls before it execs. Usage: vforker N.
 * Waits for a line on stdin, calls fc_work(i) N times, then vforks: the child calls
 * fc_work(1000 + i) N times and execs "vforker N exec", which calls fc_work(2000 + i) 3N times
 * and exits 0. The parent waits for it and prints "parent N child STATUS". */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

__attribute__((noinline)) long fc_work(long x) { return x * 7 + 2; }

int main(int argc, char **argv) {
    if (argc < 2) return 2;
    long n = atol(argv[1]), sink = 0;
    if (argc > 2 && strcmp(argv[2], "exec") == 0) {
        for (long i = 0; i < 3 * n; i++) sink += fc_work(2000 + i);
        return sink == 0;  /* never 0: exits 0 */
    }
    char line[16];
    if (!fgets(line, sizeof line, stdin)) return 2;
    for (long i = 0; i < n; i++) sink += fc_work(i);
    pid_t pid = vfork();
    if (pid == 0) {
        volatile long child_sink = 0;
        for (long i = 0; i < n; i++) child_sink += fc_work(1000 + i);
        execl(argv[0], argv[0], argv[1], "exec", (char *)NULL);
        _exit(127);
    }
    int status = 0;
    waitpid(pid, &status, 0);
    printf("parent %ld child %d\n", n, WIFEXITED(status) ? WEXITSTATUS(status) : -1);
    return sink ? 0 : 1;
}
