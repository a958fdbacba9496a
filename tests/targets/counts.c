/* THREADS threads call work_a and work_b a known number of times; main prints when done.
 * Modes: "run N" does N calls per thread and exits; "loop" calls forever and keeps its own
 * counter `calls_a`, and reports readiness on stdout. */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define THREADS 4
volatile long calls_a;
volatile long bad_total;
static long n_calls;
static int forever;

__attribute__((noinline)) long work_a(long x) {
    __atomic_fetch_add(&calls_a, 1, __ATOMIC_RELAXED);
    return x * 3 + 1;
}

__attribute__((noinline)) long work_b(long x) { return x ^ 0x5a5a; }

static void *worker(void *arg) {
    long t = (long)arg, bad = 0;
    for (long i = 0; forever || i < n_calls; i++) {
        if (work_a(i + t) != (i + t) * 3 + 1) bad++;
        if ((i & 3) == 0 && work_b(i) != (i ^ 0x5a5a)) bad++;
        if (bad) { __atomic_fetch_add(&bad_total, bad, __ATOMIC_RELAXED); bad = 0; }
    }
    return (void *)bad;
}

int main(int argc, char **argv) {
    forever = argc > 1 && strcmp(argv[1], "loop") == 0;
    n_calls = argc > 2 ? atol(argv[2]) : 100000;
    pthread_t th[THREADS];
    for (long t = 0; t < THREADS; t++) pthread_create(&th[t], NULL, worker, (void *)t);
    if (forever) {
        printf("ready %d\n", getpid());
        fflush(stdout);
        char buf[16];
        /* run until stdin closes or says stop; then report wrong results */
        while (read(0, buf, sizeof buf) > 0) {}
        printf("calls_a %ld bad %ld\n", calls_a, bad_total);
        fflush(stdout);
        _exit(0);
    }
    for (long t = 0; t < THREADS; t++) pthread_join(th[t], NULL);
    printf("done calls_a=%ld bad=%ld\n", calls_a, bad_total);
    return bad_total ? 1 : 0;
}
