/* The loop benchmark target: THREADS threads each call one small function N times.
 *
 *   loop FUNC N THREADS OUTFILE [gate]
 *
 * FUNC is "work" (plain) or "atomic" (work_atomic: counter compiled in). The result line
 * "calls=C elapsed_ns=E threads=T atomic=A checksum=S" goes to OUTFILE ("-" for stdout).
 * E is the longest time any thread spent in its loop (CLOCK_MONOTONIC around the loop only,
 * threads released together), so startup and tool attach time are excluded.
 * With "gate", the program prints "ready PID" on stdout and waits for a line on stdin before the
 * loop, and for another line after writing the result before it exits.
 */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

long work(long x, long limit);
long work_atomic(long x, long limit);
extern volatile long atomic_hits;

static long n_calls;
static int use_atomic;
static pthread_barrier_t barrier;

struct result { long calls, checksum, elapsed_ns; };

static long now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1000000000L + ts.tv_nsec;
}

static void *worker(void *arg) {
    struct result *r = arg;
    long sum = 0, i, limit = n_calls / 2;
    pthread_barrier_wait(&barrier);
    long t0 = now_ns();
    if (use_atomic)
        for (i = 0; i < n_calls; i++) sum += work_atomic(i, limit);
    else
        for (i = 0; i < n_calls; i++) sum += work(i, limit);
    r->elapsed_ns = now_ns() - t0;
    r->calls = i;
    r->checksum = sum;
    return NULL;
}

int main(int argc, char **argv) {
    if (argc < 5) {
        fprintf(stderr, "usage: %s work|atomic N THREADS OUTFILE [gate]\n", argv[0]);
        return 2;
    }
    use_atomic = strcmp(argv[1], "atomic") == 0;
    n_calls = atol(argv[2]);
    int threads = atoi(argv[3]);
    if (threads < 1 || threads > 64) return 2;
    int gate = argc > 5 && strcmp(argv[5], "gate") == 0;
    if (gate) {
        char line[64];
        printf("ready %d\n", getpid());
        fflush(stdout);
        if (!fgets(line, sizeof line, stdin)) return 3;
    }
    pthread_t th[64];
    struct result res[64];
    pthread_barrier_init(&barrier, NULL, threads);
    for (int t = 1; t < threads; t++) pthread_create(&th[t], NULL, worker, &res[t]);
    worker(&res[0]);
    long calls = res[0].calls, sum = res[0].checksum, elapsed = res[0].elapsed_ns;
    for (int t = 1; t < threads; t++) {
        pthread_join(th[t], NULL);
        calls += res[t].calls;
        sum += res[t].checksum;
        if (res[t].elapsed_ns > elapsed) elapsed = res[t].elapsed_ns;
    }
    FILE *out = strcmp(argv[4], "-") == 0 ? stdout : fopen(argv[4], "w");
    if (!out) return 4;
    fprintf(out, "calls=%ld elapsed_ns=%ld threads=%d atomic=%ld checksum=%ld\n", calls, elapsed, threads,
            (long)atomic_hits, sum);
    fclose(out);
    if (gate) { /* hold until told to exit: the tool may read its count from this process */
        char line[64];
        if (!fgets(line, sizeof line, stdin)) return 0;
    }
    return 0;
}
