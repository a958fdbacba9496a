/* Functions of known duration for latency probes (tests/live/test_latency.py).
   usage: latency_main N THREADS FILE
     each thread calls spin_short (spins >= 5 us on CLOCK_MONOTONIC) and spin_long (>= 40 us)
     N times each, tiny() N times and lat_overlap() and lat_noexit() 2N times each; for every spin call it writes to FILE the duration the
     function measured inside itself (a lower bound of what a probe can see) and the duration the
     caller measured around the call (an upper bound): "short|long LO HI" per line.
     Prints "calls=... checksum=..." (the same with or without probes). */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static long now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1000000000L + ts.tv_nsec;
}

/* Spin until at least `ns` have passed; returns the time that passed, as measured inside. */
static long spin(long ns) {
    long t0 = now_ns(), t;
    do
        t = now_ns();
    while (t - t0 < ns);
    return t - t0;
}

__attribute__((noinline)) long spin_short(long x) { return spin(5000) + (x & 0); }
__attribute__((noinline)) long spin_long(long x) { return spin(40000) + (x & 0); }
/* its entry window ends with its exit: one stub does both */
__attribute__((noinline)) int tiny(int x) { return x + 1; }
int lat_overlap(int);  /* latency_short.S: entry and exit in one grown window */
int lat_noexit(int);   /* latency_short.S: no return probe, so no latency probe */

struct arg { int n; long *lo, *hi; int *kind; long sum; };

static void *worker(void *p) {
    struct arg *a = p;
    for (int i = 0; i < a->n; i++) {
        for (int k = 0; k < 2; k++) {
            int j = 2 * i + k;
            long t0 = now_ns();
            long inside = k ? spin_long(i) : spin_short(i);
            long t1 = now_ns();
            a->lo[j] = inside;
            a->hi[j] = t1 - t0;
            a->kind[j] = k;
        }
        a->sum += tiny(i) + lat_overlap(i) - lat_overlap(i) + lat_noexit(i) - lat_noexit(i);
    }
    return NULL;
}

int main(int argc, char **argv) {
    if (argc < 4)
        return 2;
    int n = atoi(argv[1]), threads = atoi(argv[2]);
    if (threads < 1 || threads > 16)
        return 2;
    pthread_t t[16];
    struct arg args[16];
    for (int k = 0; k < threads; k++) {
        args[k].n = n;
        args[k].lo = calloc(2 * n, sizeof(long));
        args[k].hi = calloc(2 * n, sizeof(long));
        args[k].kind = calloc(2 * n, sizeof(int));
        args[k].sum = 0;
        pthread_create(&t[k], NULL, worker, &args[k]);
    }
    long sum = 0;
    FILE *out = fopen(argv[3], "w");
    if (!out)
        return 3;
    for (int k = 0; k < threads; k++) {
        pthread_join(t[k], NULL);
        sum += args[k].sum;
        for (int j = 0; j < 2 * n; j++)
            fprintf(out, "%s %ld %ld\n", args[k].kind[j] ? "long" : "short", args[k].lo[j], args[k].hi[j]);
    }
    fclose(out);
    printf("calls=%d checksum=%ld\n", 3 * n * threads, sum);
    return 0;
}
