/* djprobe stress target: THREADS threads call probed functions (entry and mid-function sites:
 * straight-line arithmetic, live flags, a red-zone leaf) and check every result against an
 * unprobed reference; wrong results are counted.
 * Modes: "run N" does N iterations per thread and prints "done iters=I bad=B";
 *        "loop" runs until stdin closes, then prints "iters I bad B". */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define THREADS 8
static long n_iter;
static int forever;
volatile long bad_total, iters_total;

/* straight-line: every instruction runs exactly once per call */
__attribute__((noinline)) long s_line(long x, long y) {
    long a = x * 7 + y;
    long b = a ^ (x >> 3);
    long c = b + (a << 2) - y;
    return c * 3 + (b & 0xff);
}
static long r_line(long x, long y) {
    long a = x * 7 + y;
    long b = a ^ (x >> 3);
    long c = b + (a << 2) - y;
    return c * 3 + (b & 0xff);
}

/* flags live across instructions (compare, then conditional moves / setcc) */
__attribute__((noinline)) long s_flags(long x, long y) {
    long r = x - y;
    long s = (x < y) ? r * 2 : r + 5;
    return s + (x == y) + ((unsigned long)x > (unsigned long)y ? 11 : 0);
}
static long r_flags(long x, long y) {
    long r = x - y;
    long s = (x < y) ? r * 2 : r + 5;
    return s + (x == y) + ((unsigned long)x > (unsigned long)y ? 11 : 0);
}

/* a leaf keeping live data in the red zone */
__attribute__((noinline)) long s_red(long x) {
    volatile long buf[6];
    buf[0] = x; buf[1] = x + 1; buf[2] = x * 2; buf[3] = x ^ 3; buf[4] = x - 4; buf[5] = ~x;
    return buf[0] + 2 * buf[1] + 3 * buf[2] + 4 * buf[3] + 5 * buf[4] + 6 * buf[5];
}
static long r_red(long x) {
    return x + 2 * (x + 1) + 3 * (x * 2) + 4 * (x ^ 3) + 5 * (x - 4) + 6 * ~x;
}

/* calls another probed function as its last displaced instruction candidate */
__attribute__((noinline)) long s_call(long x) { return s_line(x, 1) + 1; }

static void *worker(void *arg) {
    long t = (long)arg, bad = 0, i;
    for (i = 0; forever || i < n_iter; i++) {
        long x = i * 2654435761L + t, y = (i >> 2) - t;
        if (s_line(x, y) != r_line(x, y)) bad++;
        if (s_flags(x, y) != r_flags(x, y)) bad++;
        if (s_flags(y, y) != r_flags(y, y)) bad++;
        if (s_red(x) != r_red(x)) bad++;
        if (s_call(x) != r_line(x, 1) + 1) bad++;
        if ((i & 1023) == 1023) {
            __atomic_fetch_add(&iters_total, 1024, __ATOMIC_RELAXED);
            if (bad) { __atomic_fetch_add(&bad_total, bad, __ATOMIC_RELAXED); bad = 0; }
        }
    }
    __atomic_fetch_add(&iters_total, i & 1023, __ATOMIC_RELAXED);
    __atomic_fetch_add(&bad_total, bad, __ATOMIC_RELAXED);
    return NULL;
}

int main(int argc, char **argv) {
    forever = argc > 1 && strcmp(argv[1], "loop") == 0;
    n_iter = argc > 2 ? atol(argv[2]) : 100000;
    pthread_t th[THREADS];
    for (long t = 0; t < THREADS; t++) pthread_create(&th[t], NULL, worker, (void *)t);
    if (forever) {
        printf("ready %d\n", getpid());
        fflush(stdout);
        char buf[16];
        while (read(0, buf, sizeof buf) > 0) {}
        printf("iters %ld bad %ld\n", iters_total, bad_total);
        fflush(stdout);
        _exit(0);
    }
    for (long t = 0; t < THREADS; t++) pthread_join(th[t], NULL);
    printf("done iters=%ld bad=%ld\n", iters_total, bad_total);
    return bad_total ? 1 : 0;
}
