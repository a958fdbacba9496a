/* djprobe test target: counts.c's loop (4 threads calling work_a and checking it), plus:
 * each line "f" on stdin forks a child that calls work_a N times from 2 threads, checks every
 * result and exits with the number of wrong ones; the parent prints "child <status> <calls>".
 * Line "e PATH ARG..." exec's PATH (the probes vanish with this image).
 * At EOF: prints "calls_a N bad M" and exits. */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#define THREADS 4
#define CHILD_CALLS 2000000L
volatile long calls_a, bad_total;

#ifdef PAD
/* shifts the code of the exec'd image so that the old image's sites land mid-function here */
__attribute__((noinline)) long pad(long x) {
    for (int i = 0; i < 64; i++) x = x * 3 + i;
    return x;
}
#endif

__attribute__((noinline)) long work_a(long x) {
    __atomic_fetch_add(&calls_a, 1, __ATOMIC_RELAXED);
    return x * 3 + 1;
}

__attribute__((noinline)) long work_b(long x) { return x ^ 0x5a5a; }

static void *worker(void *arg) {
    long t = (long)arg;
    for (long i = 0;; i++) {
        long bad = 0;
        if (work_a(i + t) != (i + t) * 3 + 1) bad++;
        if ((i & 3) == 0 && work_b(i) != (i ^ 0x5a5a)) bad++;
        if (bad) __atomic_fetch_add(&bad_total, bad, __ATOMIC_RELAXED);
    }
    return NULL;
}

static void *child_worker(void *arg) {
    long t = (long)arg, bad = 0;
    for (long i = 0; i < CHILD_CALLS; i++)
        if (work_a(i + t) != (i + t) * 3 + 1 || work_b(i) != (i ^ 0x5a5a)) bad++;
    return (void *)bad;
}

int main(int argc, char **argv) {
    (void)argc; (void)argv;
    pthread_t th[THREADS];
    for (long t = 0; t < THREADS; t++) pthread_create(&th[t], NULL, worker, (void *)t);
    printf("ready %d\n", getpid());
    fflush(stdout);
    char line[512];
    while (fgets(line, sizeof line, stdin)) {
        if (line[0] == 'f') {
            pid_t pid = fork();
            if (pid == 0) {
                /* only the forking thread exists in the child */
                pthread_t c[2];
                long bad = 0;
                for (long t = 0; t < 2; t++) pthread_create(&c[t], NULL, child_worker, (void *)t);
                for (long t = 0; t < 2; t++) { void *r; pthread_join(c[t], &r); bad += (long)r; }
                _exit(bad > 100 ? 100 : (int)bad);
            }
            int status = 0;
            waitpid(pid, &status, 0);
            printf("child %d %ld\n", status, 2 * CHILD_CALLS);
            fflush(stdout);
        } else if (line[0] == 'e') {
            char *args[16];
            int n = 0;
            for (char *tok = strtok(line + 1, " \n"); tok && n < 15; tok = strtok(NULL, " \n")) args[n++] = tok;
            args[n] = NULL;
            execv(args[0], args);
            perror("execv");
            _exit(127);
        }
    }
    printf("calls_a %ld bad %ld\n", calls_a, bad_total);
    fflush(stdout);
    _exit(0);
}
